"""The optional decord reader behind `read_video(..., decoder="decord")` (`pip install stgpt[decord]`).

decord indexes frames by demuxing and decodes from the keyframe before each target, like the default PyAV
reader, but it is not exact: on HEVC and H.264 with B-frame reordering, MPEG-1/2 and streams with
discard-flagged packets it can return neighbouring frames or a wrong count, it has no AV1 decoder (its FFmpeg is
4.1), and it has no wheels for ARM Linux or macOS. Kept for whoever wants it; the README says where it is
inexact. Packets that demux but do not decode fall back to PyAV's sequential count, as in the default reader.
"""
from __future__ import annotations

import io

import av  # before decord: decord's bundled libvpx, loaded first, breaks PyAV's VP8/VP9 encoders
import numpy as np

from stgpt.video import (TRUNCATION_FRACTION, TRUNCATION_MIN_GAP_S, SampledVideo, VideoDecodeError, read_video as
                         _read_exact, resized_shape, sample_indices)

try:
    import decord
except ImportError:  # pragma: no cover - depends on the platform
    decord = None


def read_video(source: str | bytes, num_frames: int, label: str, short_side: int | None,
               num_threads: int) -> SampledVideo:
    """decord's sample of `num_frames` frames; `source` is a checked path or non-empty bytes."""
    if decord is None:
        raise RuntimeError("video.decoder=decord needs decord: pip install 'stgpt[decord]' (x86-64 Linux and "
                           "Windows wheels only), or use the default decoder, pyav")
    data = source if isinstance(source, bytes) else open(source, "rb").read()
    size_kwargs = {}
    if short_side is not None:
        width, height = _frame_size(data, label)
        new_h, new_w = resized_shape(height, width, short_side)
        size_kwargs = {"width": new_w, "height": new_h}
    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=num_threads, **size_kwargs)
    except Exception:
        # let the exact reader say what is wrong with the file (or read it, if only decord cannot)
        return _read_exact(data, num_frames, name=label, short_side=short_side)
    num_source = len(reader)
    if num_source == 0:
        raise VideoDecodeError(label, "no decodable frames")
    _check_not_truncated(reader, num_source, _declared(data), label)
    indices = sample_indices(num_source, num_frames)
    try:
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception:
        # packets that demux but do not decode: decord is not reliable after a decoding error
        return _read_exact(data, num_frames, name=label, short_side=short_side)
    return SampledVideo(frames=np.ascontiguousarray(frames, dtype=np.uint8), indices=indices,
                        num_source_frames=num_source, fps=float(reader.get_avg_fps() or 0.0))


def _frame_size(data: bytes, label: str) -> tuple[int, int]:
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.best("video")
            return int(stream.codec_context.width), int(stream.codec_context.height)
    except Exception:
        return 0, 0


def _declared(data: bytes) -> float | None:
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.best("video")
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            return container.duration / 1_000_000 if container.duration is not None else None
    except Exception:
        return None


def _check_not_truncated(reader, num_source: int, declared: float | None, label: str) -> None:
    if not declared or declared <= 0:
        return
    try:
        end = float(reader.get_frame_timestamp(num_source - 1)[1])
    except Exception:
        return
    if end < TRUNCATION_FRACTION * declared and declared - end > TRUNCATION_MIN_GAP_S:
        raise VideoDecodeError(label, f"truncated: frames end at {end:.2f}s but the container declares {declared:.2f}s")
