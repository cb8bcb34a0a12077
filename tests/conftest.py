"""Shared fixtures: one simulated multi-node Ray cluster per test session, and small generated assets.

Starting Ray costs seconds, so every test that needs Ray uses the same cluster: a head and two worker nodes
(`ray.cluster_utils.Cluster`) in this one machine. Tests of distributed features check that work reached more
than one node.
"""
from __future__ import annotations

import os

import av  # noqa: F401  (before decord, which breaks PyAV's VP8/VP9 encoders if loaded first)
import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("STGPT_TEST_DECODER_FAULTS", "1")  # isolated decoders may be told to crash (stgpt/isolation.py)

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


def write_test_video(path, num_frames: int = 40, width: int = 160, height: int = 120, fps: int = 10,
                     container: str = "mp4", faststart: bool = False):
    """Write a video whose frame i is a flat grey of level 4*i (so a decoded frame tells its own index)."""
    import av
    import numpy as np

    codec, fmt = ("libvpx-vp9", "webm") if container == "webm" else ("libx264", "mp4")
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format=fmt, options=options) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "0", "preset": "ultrafast"}
        for i in range(num_frames):
            frame = np.full((height, width, 3), (4 * i) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture
def make_video(tmp_path):
    """Factory: `make_video(name, **kwargs)` writes a test video under tmp_path and returns its path."""
    def make(name: str = "video.mp4", **kwargs):
        return write_test_video(tmp_path / name, **kwargs)

    return make
