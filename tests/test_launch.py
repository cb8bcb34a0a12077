"""stgpt.launch: every job's parser, where it connects, how big a local Ray it starts, and its exit statuses."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stgpt.annotations import AnnotationError
from stgpt.config import ConfigError, load_config
from stgpt.launch import cluster_address, exits, job_parser, local_cpus, parse
from stgpt.resources import evaluation_plan, training_plan

REPO = Path(__file__).resolve().parents[1]


def test_overrides_go_before_or_after_the_options():
    parser = job_parser("doc")
    parser.add_argument("--output")
    args, cfg = parse(parser, ["train.epochs=3", "--output", "o", "generation.num_beams=2"])
    assert args.output == "o" and cfg.train.epochs == 3 and cfg.generation.num_beams == 2
    with pytest.raises(ConfigError, match="nope"):
        parse(parser, ["nope.key=1"])


def test_the_cluster_comes_from_ray_address_then_the_config(monkeypatch):
    cfg = load_config(None, ["cluster.address=ray://head:10001"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(cfg) == "ray://head:10001" and cluster_address(load_config(None)) is None
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert cluster_address(cfg) == "auto"


def test_a_local_ray_holds_what_the_job_asks_for_at_once(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert local_cpus(None) == 2
    assert local_cpus(training_plan(load_config(None, ["train.num_workers=4"]))) == 5  # 4 workers + Ray Data's CPU
    assert local_cpus(training_plan(load_config(None, ["train.num_workers=auto"]))) == 2  # auto: shrinks to fit
    assert local_cpus(evaluation_plan(load_config(None, ["evaluate.num_actors=3", "evaluate.cpus_per_actor=2"]))) == 7


def test_exit_statuses_say_what_happened(capsys):
    @exits(failed=(RuntimeError,))
    def job(error: BaseException | None) -> int:
        if error is not None:
            raise error
        return 0

    assert job(None) == 0
    assert job(ConfigError("bad key")) == 2 and "error: bad key" in capsys.readouterr().err
    assert job(AnnotationError("line 3: not JSON")) == 2
    assert job(FileNotFoundError("no such folder")) == 2
    assert job(RuntimeError("nothing scored")) == 1 and "nothing scored" in capsys.readouterr().err
    with pytest.raises(KeyError):  # a bug is not dressed up as a usage error
        job(KeyError("bug"))


def test_a_job_starts_a_private_local_ray_and_stops_it():
    """With no RAY_ADDRESS a job never joins another Ray on the machine: it starts its own, sized for its plan,
    and shuts it down at the end (run in a fresh interpreter, outside the test session's cluster)."""
    code = textwrap.dedent("""
        import ray
        from stgpt.config import load_config
        from stgpt.launch import connect
        from stgpt.resources import training_plan
        cfg = load_config(None, ["train.num_workers=3", "train.cpus_per_worker=1", "cluster.data_cpus=1"])
        with connect(cfg, training_plan(cfg), include_dashboard=False, log_to_driver=False):
            print("cpus", int(ray.cluster_resources()["CPU"]))
        print("after", ray.is_initialized())
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("cpus", "after"))]
    assert lines == [f"cpus {max(4, __import__('os').cpu_count())}", "after False"]
