"""Fine-tune SpaceTimeGPT with Ray Train, reading the Parquet shards that jobs/preprocess.py writes.

    python jobs/train.py                                    # embedded default: tiny model, synthetic data, local Ray
    python jobs/train.py --config configs/vatex.yaml train.num_workers=8
    ray job submit --working-dir . -- python jobs/train.py --config configs/tiny.yaml train.output_dir=/shared/run

Ray: the cluster of RAY_ADDRESS (`ray job submit` sets it; `export RAY_ADDRESS=auto` joins a `ray start` cluster
on this machine), else a new local one. With no `data.annotations` in the config the data is the synthetic
dataset, made and preprocessed into `data.shards` first if missing, and at the end the best checkpoint captions
the synthetic test split and the colour / shape / motion accuracy of its captions is printed.

Output: `<train.output_dir>/best` (a plain Hugging Face checkpoint: the job's result), `tensorboard/`,
`summary.json`. Re-running with the same `train.output_dir` resumes from the latest checkpoint.
Exit status 2: the job cannot fit the cluster (the message names the numbers and the override); 1: it stalled
for `cluster.stall_fail_s` (the message says what Ray has pending).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/train.py` from a checkout

from stgpt.config import CONFIG_DIR, load_config  # noqa: E402
from stgpt.resources import ResourceError, Watchdog, exit_stalled, fit_training  # noqa: E402
from stgpt.training import (init_local_ray, local_ray_cpus, prepare_synthetic_shards, run_training,  # noqa: E402
                            synthetic_accuracy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG_DIR / "tiny.yaml"), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=2")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before or after the options
    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()

    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:  # local: leave Ray Data at least one CPU beside the training workers
            init_local_ray(num_cpus=local_ray_cpus(cfg))
    try:  # before any work: a job that cannot fit the cluster says so now instead of hanging later
        cfg = fit_training(cfg)
    except ResourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    synthetic = cfg.data.annotations is None
    if synthetic:
        with Watchdog.from_config("video preprocessing", cfg.cluster, on_fail=exit_stalled):
            prepare_synthetic_shards(cfg)
    result = run_training(cfg, on_stall=exit_stalled)
    print(f"best checkpoint: {result.best_dir}  ({cfg.train.checkpoint_metric}="
          f"{result.best_metrics.get(cfg.train.checkpoint_metric)}, epoch {result.best_metrics.get('epoch')})")
    print(f"tensorboard --logdir {Path(cfg.train.output_dir).resolve() / 'tensorboard'}")

    if synthetic and result.best_dir is not None:
        accuracy = synthetic_accuracy(cfg, result.best_dir)
        print("synthetic test split, attributes named right by generated captions (chance in brackets): "
              + ", ".join(f"{k} {accuracy[k]:.1%} ({accuracy['chance'][k]:.0%})" for k in ("colour", "shape", "motion"))
              + f"; whole video right {accuracy['video']:.1%} of {int(accuracy['num_videos'])}")
        for example in accuracy["examples"][:3]:
            print(f"  {example['video_id']}: {example['prediction']!r}  truth {example['truth']}")
        summary_path = result.best_dir.parent / "summary.json"
        summary = json.loads(summary_path.read_text())
        summary.update(test_accuracy=accuracy, wall_seconds=time.perf_counter() - start)
        summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
