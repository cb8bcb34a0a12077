"""Shared fixtures: one simulated multi-node Ray cluster per test session, and small generated assets.

Starting Ray costs seconds, so every test that needs Ray uses the same cluster: a head and two worker nodes
(`ray.cluster_utils.Cluster`) in this one machine. Tests of distributed features check that work reached more
than one node.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_NODES = 3
CPUS_PER_NODE = 2


@pytest.fixture(scope="session")
def ray_cluster():
    """A head plus two worker nodes, each with 2 logical CPUs; `ray.init` is connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": CPUS_PER_NODE, "object_store_memory": 400 * 1024**2},
    )
    for _ in range(NUM_NODES - 1):
        cluster.add_node(num_cpus=CPUS_PER_NODE, object_store_memory=400 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except Exception:  # pragma: no cover - older Ray
        pass
    yield cluster
    ray.shutdown()
    cluster.shutdown()
