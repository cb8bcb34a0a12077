"""A job fits the cluster it lands on or says why not, and a stalled job says what it waits for.

* The fit check (no Ray): the default training and evaluation configs do not fit one 2-CPU node or two 1-CPU
  nodes beside Ray Data's CPU, and the message names the numbers and the override; `auto` sizes the group;
  an autoscaling cluster is waited for, with a line saying what for.
* The watchdog, on the session cluster: a Ray Data pipeline made to stall (its map asks for 3 CPUs, more than
  any node has) is reported with Ray's pending demand and the waiting operator, and failed past the second
  limit; the pipeline then finishes when a node big enough joins.
* Real clusters through `ray job submit` (slow): `ray start --head --num-cpus=2`, and a head plus a worker of
  1 CPU each. The default training and evaluation configs exit 2 within seconds with the message (before any
  preprocessing); training with `train.num_workers=auto` on a small run finishes.
"""
from __future__ import annotations

import re
import threading
import time

import pytest

from stgpt.config import ConfigError, load_config
from stgpt.resources import (ClusterView, ResourceError, Watchdog, ensure_fits, evaluation_plan, explain, fit_plan,
                             pending_report, training_plan)
from local_cluster import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny.yaml")


def test_default_training_does_not_fit_two_cpus_and_says_which_override_does():
    cfg = load_config(TINY)
    for nodes in ([{"CPU": 2.0}], [{"CPU": 1.0}, {"CPU": 1.0}]):
        cluster = ClusterView(nodes)
        assert fit_plan(training_plan(cfg), cluster) is None
        message = explain(training_plan(cfg), cluster)
        assert "2 training worker(s) x 1 CPU" in message and "= 3 CPU" in message, message
        assert "the cluster has 2 CPU" in message and "train.num_workers=1" in message, message
    assert fit_plan(training_plan(cfg), ClusterView([{"CPU": 3.0}])) is not None
    # A worker's bundle must fit on one node: two half-free nodes do not hold a 2-CPU worker.
    big = load_config(TINY, ["train.num_workers=1", "train.cpus_per_worker=2"])
    assert fit_plan(training_plan(big), ClusterView([{"CPU": 1.5}, {"CPU": 1.5}])) is None


def test_auto_sizes_the_group_to_the_cluster():
    cfg = load_config(TINY, ["train.num_workers=auto"])
    assert fit_plan(training_plan(cfg), ClusterView([{"CPU": 1.0}, {"CPU": 1.0}])).groups[0].count == 1
    assert fit_plan(training_plan(cfg), ClusterView([{"CPU": 2.0}] * 3)).groups[0].count == 5
    assert fit_plan(training_plan(cfg), ClusterView([{"CPU": 1.0}])) is None  # no CPU left for Ray Data
    gpu = load_config(TINY, ["train.num_workers=auto", "train.use_gpu=true"])
    assert fit_plan(training_plan(gpu), ClusterView([{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}])
                    ).groups[0].count == 3
    with pytest.raises(ResourceError, match=r"1 GPU.*the cluster has 4 CPU"):
        ensure_fits(training_plan(gpu), gpu.cluster, log=lambda _: None, view=lambda: ClusterView([{"CPU": 4.0}]))
    ev = load_config(TINY, ["evaluate.num_actors=auto"])
    assert fit_plan(evaluation_plan(ev), ClusterView([{"CPU": 2.0}])).groups[0].count == 1
    with pytest.raises(ConfigError, match=r"train.num_workers: expected an integer or 'auto', got 'many'"):
        load_config(TINY, ["train.num_workers=many"])


def test_an_autoscaling_cluster_is_waited_for_with_a_line_saying_what_for(monkeypatch):
    monkeypatch.setattr("stgpt.resources.POLL_S", 0.01)
    cfg = load_config(TINY, ["cluster.wait_for_nodes_s=30"])
    views = iter([ClusterView([{"CPU": 2.0}], autoscaling=True)] * 3 + [ClusterView([{"CPU": 2.0}] * 2, True)])
    lines = []
    plan = ensure_fits(training_plan(cfg), cfg.cluster, log=lines.append, view=lambda: next(views))
    assert plan.groups[0].count == 2
    assert len(lines) == 1 and "waiting up to 30 s for the autoscaler" in lines[0] and "= 3 CPU" in lines[0]
    short = load_config(TINY, ["cluster.wait_for_nodes_s=0.05"])
    with pytest.raises(ResourceError, match="train.num_workers=1"):
        ensure_fits(training_plan(short), short.cluster, log=lambda _: None,
                    view=lambda: ClusterView([{"CPU": 2.0}], autoscaling=True))


def test_watchdog_warns_then_fails_and_progress_keeps_it_quiet():
    lines, failures = [], []
    with Watchdog("step", warn_s=0.3, fail_s=1.0, on_fail=failures.append, diagnose=lambda: "2 tasks waiting",
                  log=lines.append, interval_s=0.05) as dog:
        for _ in range(10):  # steps finishing every 0.1 s: no warning
            time.sleep(0.1)
            dog.beat()
        assert not lines
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
    assert any(line.startswith("no step finished for") and "2 tasks waiting" in line for line in lines), lines
    assert failures and "stalled: no step finished" in failures[0] and "2 tasks waiting" in failures[0]


def test_watchdog_reports_a_stalled_ray_data_pipeline(ray_cluster):
    """The pipeline's map asks for more CPUs than a node has: the report names the demand and the operator; a
    node big enough joins, and the pipeline finishes."""
    import ray

    def _identity(batch):  # defined here so Ray pickles it by value (workers cannot import this test module)
        return batch

    failures, lines = [], []
    dataset = ray.data.range(4, override_num_blocks=2).map_batches(_identity, num_cpus=3)
    rows: list = []
    errors: list = []

    def run() -> None:
        try:
            rows.extend(dataset.iter_rows())
        except Exception as exc:  # noqa: BLE001 - shown by the assertion below
            errors.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    node = None
    with Watchdog("row", warn_s=2, fail_s=6, on_fail=failures.append, log=lines.append, interval_s=0.5):
        runner.start()
        deadline = time.monotonic() + 120
        while not failures and time.monotonic() < deadline:
            time.sleep(0.2)
    try:
        assert failures, lines
        assert failures[0].startswith("stalled: no row finished for"), failures
        assert re.search(r"resource demands: [^;]*\{3 CPU\}", failures[0]), failures
        assert re.search(r"Ray Data \S+: .*MapBatches\(_identity\)", failures[0]), failures
        assert any(line.startswith("no row finished for") for line in lines), lines  # the warning came first
        node = ray_cluster.add_node(num_cpus=3, object_store_memory=200 * 1024**2)
        runner.join(timeout=300)
        assert sorted(r["id"] for r in rows) == [0, 1, 2, 3], (errors, pending_report())
    finally:
        if node is not None:
            ray_cluster.remove_node(node)
    assert "{3 CPU}" not in pending_report()


# ----------------------------------------------------------------------------------------------------------
# Real clusters, jobs through `ray job submit`

SMALL_RUN = ["data.synthetic_train=8", "data.synthetic_validation=4", "data.synthetic_test=4", "train.epochs=1",
             "train.batch_size=2", "generation.num_beams=1", "generation.max_new_tokens=4"]


def _submit(cluster, args, tmp_path, timeout=300):
    outputs = [f"data.root={tmp_path}/data", f"data.shards={tmp_path}/shards", f"train.output_dir={tmp_path}/train",
               f"evaluate.output_dir={tmp_path}/eval"]
    start = time.monotonic()
    result = cluster.job_submit(["python", *args, *outputs], working_dir=REPO_ROOT, timeout=timeout,
                                extra_args=["--runtime-env-json", '{"excludes": [".venv", "outputs", ".git"]}'])
    return result, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("workers,cpus", [(0, 2), (1, 1)], ids=["head-2cpu", "2-nodes-1cpu"])
def test_default_configs_exit_2_with_the_message_on_a_small_cluster(tmp_path, workers, cpus):
    from local_cluster import local_ray_cluster

    with local_ray_cluster(num_workers=workers, cpus_per_node=cpus) as cluster:
        result, _ = _submit(cluster, ["jobs/train.py", "--config", "configs/tiny.yaml"], tmp_path)
        assert result.returncode != 0, result.stdout[-3000:]
        assert "exit code 2" in result.stdout or "exited with code 2" in result.stdout, result.stdout[-3000:]
        assert "train.num_workers=1" in result.stdout and "the cluster has 2 CPU" in result.stdout
        assert not (tmp_path / "shards").exists()  # said so before preprocessing anything
        result, _ = _submit(cluster, ["jobs/evaluate.py", "--config", "configs/tiny.yaml"], tmp_path)
        assert "evaluate.num_actors=1" in result.stdout and result.returncode != 0, result.stdout[-3000:]
        if workers:  # the same small run, fitted: finishes on two 1-CPU nodes
            result, _ = _submit(cluster, ["jobs/train.py", "--config", "configs/tiny.yaml", "train.num_workers=auto",
                                          *SMALL_RUN], tmp_path, timeout=900)
            assert result.returncode == 0, result.stdout[-5000:]
            assert "train.num_workers=auto: 1 training worker(s)" in result.stdout
            assert (tmp_path / "train" / "best" / "config.json").exists()
