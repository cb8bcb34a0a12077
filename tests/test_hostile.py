"""Hostile input: every decoding limit refuses its bomb with a VideoDecodeError naming the limit, and isolated
decoding turns a crash, a hang or a memory bomb into one video's error while the caller carries on."""
import dataclasses

import httpx
import numpy as np
import pytest

import hostile_corpus as hostile
from stgpt.config import VideoConfig
from stgpt.isolation import CRASH, HANG, MEMORY_BOMB, sample_video_isolated
from stgpt.serving_guard import UploadGuard
from stgpt.video import VideoDecodeError, VideoLimitError, read_video, sample_video

VIDEO = VideoConfig(short_side=32, crop_size=32)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {
        "resolution": (hostile.resolution_bomb(root / "resolution.mp4"), "max_pixels"),
        "aspect": (hostile.aspect_bomb(root / "aspect.mp4"), "max_aspect_ratio"),
        "duration": (hostile.duration_bomb(root / "duration.mkv"), "max_seconds"),
        "resolution change": (hostile.resolution_change(root / "change.ts"), "max_pixels"),
    }


@pytest.mark.parametrize("kind", ["resolution", "aspect", "duration", "resolution change"])
@pytest.mark.parametrize("isolated", [False, True])
def test_each_bomb_is_refused_naming_its_limit(bombs, kind, isolated):
    path, limit = bombs[kind]
    read = sample_video_isolated if isolated else sample_video
    with pytest.raises(VideoLimitError) as info:
        read(path, VIDEO)
    assert info.value.limit == limit and f"video.{limit}" in str(info.value)


def test_resolution_changed_mid_stream_is_caught_on_the_decoded_frame(bombs):
    path, _ = bombs["resolution change"]
    with pytest.raises(VideoLimitError, match="decodes to 4000x2400"):
        read_video(path, 8)


def test_frame_count_limit(tmp_path):
    path = hostile.frame_count_bomb(tmp_path / "many.mp4", frames=600, fps=1000)  # 0.6 s "long"
    with pytest.raises(VideoLimitError, match="over the limit of 500|over 500 frames") as info:
        sample_video(path, dataclasses.replace(VIDEO, max_frames=500))
    assert info.value.limit == "max_frames"
    assert sample_video(path, VIDEO).num_source_frames == 600  # under the default it is just a video


def test_a_small_decoy_stream_does_not_hide_a_large_one(tmp_path):
    """Limits apply to the stream actually decoded, never to stream 0's header."""
    path = hostile.decoy_streams(tmp_path / "decoy.mkv")
    try:
        video = read_video(path, 4)
    except VideoLimitError as exc:
        assert exc.limit == "max_pixels"
    else:
        assert video.frames.shape[1] * video.frames.shape[2] <= VideoConfig().max_pixels


def test_decode_cpu_budget(bombs, tmp_path):
    path = hostile.frame_count_bomb(tmp_path / "many.mp4", frames=300)
    with pytest.raises(VideoLimitError) as info:
        sample_video(path, dataclasses.replace(VIDEO, decode_cpu_seconds=0.0))
    assert info.value.limit == "decode_cpu_seconds"


@pytest.mark.parametrize("fault, reason", [(CRASH, "crashed on this file (killed by SIGSEGV)"),
                                           (HANG, "took longer than 2s (stopped)"),
                                           (MEMORY_BOMB, "memory limit")])
def test_isolated_decoder_faults_cost_one_video(make_video, fault, reason):
    good = make_video(num_frames=16).read_bytes()
    with pytest.raises(VideoDecodeError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        sample_video_isolated(fault + good, dataclasses.replace(VIDEO, decode_memory_mb=512), name="bad",
                              timeout_s=2)
    # the caller is unharmed: the next video decodes, in a fresh child, to what an in-process read gives
    assert np.array_equal(sample_video_isolated(good, VIDEO).frames, sample_video(good, VIDEO).frames)


def test_mutated_files_decode_or_fail_cleanly_in_a_child(tmp_path):
    """Seeded mutations of small H.264, HEVC and MPEG-4 files: frames or one VideoDecodeError each, never more."""
    mutants = hostile.mutations(hostile.small_clips(tmp_path / "seeds"), count=45, seed=7)
    outcomes = {"frames": 0, "error": 0}
    for name, data in mutants:
        try:
            video = sample_video_isolated(data, VIDEO, name=name, timeout_s=30)
        except VideoDecodeError as exc:
            assert exc.source == name and exc.reason
            outcomes["error"] += 1
        else:
            assert video.frames.shape[0] == VIDEO.num_frames and video.frames.dtype == np.uint8
            outcomes["frames"] += 1
    assert sum(outcomes.values()) == len(mutants) and outcomes["frames"] > 0


# --------------------------------------------------------------------------------------------------------
# The proxy's guard (the ASGI middleware Ray's proxy loads), on a plain ASGI app.


async def _echo(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


@pytest.fixture
def guarded():
    transport = httpx.ASGITransport(app=UploadGuard(_echo, token="s3cret", max_upload_mb=1))
    return httpx.AsyncClient(transport=transport, base_url="http://guard")


def _chunks(data: bytes, size: int = 64 * 1024):
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.mark.anyio
async def test_guard_refuses_before_the_body_is_read(guarded):
    auth = {"authorization": "Bearer s3cret"}
    async with guarded as client:
        assert (await client.post("/caption", content=b"x")).status_code == 401
        assert (await client.post("/caption", content=b"x", headers={"authorization": "Bearer nope"})).status_code == 401
        assert (await client.get("/healthz")).status_code == 200  # other routes are open
        ok = await client.post("/caption", content=b"abc", headers=auth)
        assert ok.status_code == 200 and ok.text == "3"
        big = await client.post("/caption", content=bytes(2 * 1024 * 1024), headers=auth)
        assert big.status_code == 413 and big.json()["error"] == "upload_too_large"

        async def stream():
            for chunk in _chunks(bytes(2 * 1024 * 1024)):
                yield chunk

        chunked = await client.post("/caption", content=stream(), headers=auth)
        assert chunked.status_code == 413


# --------------------------------------------------------------------------------------------------------
# jobs/serve.py as a user runs it: its own local Ray, the guard loaded in Ray's proxy.


@pytest.mark.slow
def test_serve_job_listens_locally_and_its_proxy_refuses_before_the_body(tmp_path, make_video):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    from stgpt.checkpoints import ensure_demo_checkpoint

    repo = Path(__file__).resolve().parents[1]
    checkpoint = ensure_demo_checkpoint(tmp_path / "tiny")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["STGPT_SERVE_TOKEN"] = "job-token"
    job = subprocess.Popen([sys.executable, str(repo / "jobs" / "serve.py"), "--checkpoint", str(checkpoint),
                            "--port", str(port), "--num-replicas", "1", "serve.max_upload_mb=1"],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert job.poll() is None, job.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("jobs/serve.py did not come up")
        with socket.socket() as probe:  # 127.0.0.1 by default: not on the machine's other addresses
            probe.settimeout(2)
            other = socket.gethostbyname(socket.gethostname())
            if not other.startswith("127."):
                assert probe.connect_ex((other, port)) != 0
        video = make_video(num_frames=16).read_bytes()
        assert httpx.post(f"{base}/caption", content=video).status_code == 401
        big = httpx.post(f"{base}/caption", content=bytes(2 * 1024 * 1024),
                         headers={"authorization": "Bearer job-token"})
        assert big.status_code == 413 and "this service accepts" in big.json()["detail"]  # the proxy's guard
        good = httpx.post(f"{base}/caption", params={"num_beams": 2, "max_new_tokens": 4}, content=video,
                          headers={"authorization": "Bearer job-token"}, timeout=60)
        assert good.status_code == 200, good.text
    finally:
        os.killpg(job.pid, signal.SIGINT)
        try:
            job.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(10)
