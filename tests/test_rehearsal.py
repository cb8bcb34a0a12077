"""The full-scale recipe rehearsed end to end: configs/vatex.yaml's four jobs at full width with stand-in parts."""
from __future__ import annotations

import json
import math

import pytest

from stgpt.rehearsal import REPO_ROOT, rehearse


@pytest.mark.slow
def test_the_vatex_recipe_runs_end_to_end_at_full_width(tmp_path):
    from local_cluster import local_ray_cluster

    # 1 encoder and 1 decoder layer, every width, vocabulary, resolution and generation setting the recipe's
    with local_ray_cluster(num_workers=1, cpus_per_node=2) as cluster:
        # the training job's placement-group cleaner must ask this cluster (see stgpt.launch.start_local_ray)
        env = json.dumps({"env_vars": {"RAY_API_SERVER_ADDRESS": cluster.dashboard_url}})

        def submit(command, timeout):
            return cluster.job_submit(command, working_dir=REPO_ROOT, runtime_env_json=env, timeout=timeout)

        done = rehearse(tmp_path / "rehearsal", encoder_layers=1, decoder_layers=1, max_steps=1, videos=2,
                        timeout=480, runner=submit, serve_env={**cluster.env, "RAY_ADDRESS": cluster.address},
                        log=lambda _: None)

    model = json.loads((tmp_path / "rehearsal" / "train" / "best" / "config.json").read_text())
    assert model["encoder"]["hidden_size"] == 768 and model["encoder"]["image_size"] == 224
    assert model["encoder"]["num_frames"] == 8 and model["decoder"]["vocab_size"] == 50257
    (epoch,) = done.train_epochs  # 2 videos over 2 workers, batch 1: the one step max_steps allows
    assert epoch["step"] == 1 and epoch["samples"] == 2 and epoch["peak_rss_mb"] > 0
    assert math.isfinite(epoch["val_loss"])  # both workers validated (2 videos)
    generation = json.loads((tmp_path / "rehearsal" / "train" / "best" / "generation_config.json").read_text())
    assert (generation["num_beams"], generation["min_new_tokens"], generation["max_new_tokens"]) == (8, 30, 60)
    assert done.eval_metrics["counts"]["predictions"] == 1 and "CIDEr-D" in done.eval_metrics["corpus"]
    assert done.served["caption"] and done.served["generation"]["num_beams"] == 8
