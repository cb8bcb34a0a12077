"""Video decoding and SpaceTimeGPT's frame sampling.

A video is opened with decord from a path or from bytes, `num_frames` indices are sampled evenly with the rule the
original code used (`np.linspace(0, n, num_frames, endpoint=False)`), and those frames come back as a uint8 RGB
array `(num_frames, H, W, 3)`.

Frame counts. The original decoded every frame twice to count them because container metadata is often wrong.
decord builds its frame index by demuxing the packets (no decoding), which is exact for every frame the file
still holds, so `len(reader)` is the count we sample from. Two ways it can still be wrong are handled:
- a file cut short after its header: the container declares a duration the packets no longer cover. We compare
  the last frame's end time with the declared duration and reject the file as truncated;
- packets that demux but do not decode: the batch read fails, so we count the frames that really decode (a
  sequential PyAV pass, only on this rare path: decord is not deterministic after a decoding error) and sample
  again within them. An index past the real end is never read, and no damaged frame is returned.

Every failure raises `VideoDecodeError`, which names the video and the reason.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import av  # before decord: decord's bundled libvpx, loaded first, breaks PyAV's VP8/VP9 encoders
import decord
import numpy as np

VideoSource = Union[str, os.PathLike, bytes]

# A file whose decodable frames end before this fraction of its declared duration (and more than
# TRUNCATION_MIN_GAP_S seconds early) is reported as truncated. Audio tracks can outlast the video a little.
TRUNCATION_FRACTION = 0.8
TRUNCATION_MIN_GAP_S = 1.0


class VideoDecodeError(Exception):
    """A video could not be decoded; `source` names it and `reason` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass
class SampledVideo:
    """Frames sampled from one video, with where they came from."""

    frames: np.ndarray  # uint8 (num_frames, H, W, 3), RGB
    indices: np.ndarray  # int64 (num_frames,), indices into the decodable frames
    num_source_frames: int  # decodable frames in the video
    fps: float


def sample_indices(num_source_frames: int, num_frames: int = 8) -> np.ndarray:
    """SpaceTimeGPT's rule: `num_frames` evenly spaced indices; short videos repeat frames deterministically."""
    if num_source_frames <= 0:
        raise ValueError(f"cannot sample from {num_source_frames} frames")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    return np.linspace(0, num_source_frames, num_frames, endpoint=False).astype(np.int64)


def describe_source(source: VideoSource) -> str:
    """A short name for a video source, for error messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return os.fspath(source)


def read_video(
    source: VideoSource,
    num_frames: int = 8,
    *,
    name: str | None = None,
    short_side: int | None = None,
    num_threads: int = 1,
) -> SampledVideo:
    """Decode `num_frames` evenly sampled frames of a video given as a path or as bytes.

    `short_side` asks the decoder to scale frames so their shorter edge has that length (aspect kept), which is
    much cheaper than decoding full-size frames and resizing afterwards. `name` overrides the name used in errors
    (useful for bytes). Raises `VideoDecodeError` for every kind of bad input.
    """
    label = name or describe_source(source)
    data = _read_bytes(source, label)
    declared_duration, width, height = _probe_container(data, label)

    size_kwargs = {}
    if short_side is not None:
        size_kwargs = _scaled_size(width, height, short_side)
    reader = _open_reader(data, label, num_threads, size_kwargs)

    num_source = len(reader)
    if num_source == 0:
        raise VideoDecodeError(label, "no decodable frames")
    fps = float(reader.get_avg_fps() or 0.0)
    _check_not_truncated(reader, num_source, declared_duration, label)

    indices = sample_indices(num_source, num_frames)
    try:
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception:
        # Packets that demux but do not decode. decord is not reliable after a decoding error, so PyAV decodes
        # sequentially (deterministic): once to count the frames that really decode, once to take the samples.
        num_source = _count_decodable(data)
        if num_source == 0:
            raise VideoDecodeError(label, "no decodable frames") from None
        indices = sample_indices(num_source, num_frames)
        frames = _decode_sequentially(data, indices, size_kwargs)

    if frames.ndim != 4 or frames.shape[0] != num_frames or frames.shape[-1] != 3:
        raise VideoDecodeError(label, f"decoder returned frames of unexpected shape {frames.shape}")
    return SampledVideo(frames=np.ascontiguousarray(frames, dtype=np.uint8), indices=indices,
                        num_source_frames=num_source, fps=fps)


def _read_bytes(source: VideoSource, label: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.exists():
            raise VideoDecodeError(label, "file not found")
        if not path.is_file():
            raise VideoDecodeError(label, "not a regular file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise VideoDecodeError(label, f"cannot read file ({exc.strerror})") from None
    if not data:
        raise VideoDecodeError(label, "empty file (0 bytes)")
    return data


def _probe_container(data: bytes, label: str) -> tuple[float | None, int, int]:
    """Read the container header: the declared duration in seconds (None if absent) and the frame size."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(label, "no video stream (not a video, or audio only)")
            stream = container.streams.video[0]
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            return duration, int(stream.codec_context.width), int(stream.codec_context.height)
    except VideoDecodeError:
        raise
    except Exception as exc:
        raise VideoDecodeError(label, f"{_guess_damage(data)} ({_short_message(exc)})") from None


def _open_reader(data: bytes, label: str, num_threads: int, size_kwargs: dict):
    try:
        return decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=num_threads, **size_kwargs)
    except Exception as exc:
        if "av_read_frame" in str(exc):
            reason = "truncated or corrupt video (the decoder could not index its frames)"
        elif _count_decodable(data) == 0:
            reason = "no decodable frames"
        else:
            reason = f"cannot open video ({_short_message(exc)})"
        raise VideoDecodeError(label, reason) from None


def _check_not_truncated(reader, num_source: int, declared: float | None, label: str) -> None:
    if not declared or declared <= 0:
        return
    try:
        end = float(reader.get_frame_timestamp(num_source - 1)[1])
    except Exception:
        return
    if end < TRUNCATION_FRACTION * declared and declared - end > TRUNCATION_MIN_GAP_S:
        raise VideoDecodeError(
            label, f"truncated: frames end at {end:.2f}s but the container declares {declared:.2f}s"
        )


def _sequential_frames(data: bytes):
    """Yield decoded frames in order until the first one that fails to decode."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"
        try:
            yield from container.decode(stream)
        except av.error.FFmpegError:
            return


def _count_decodable(data: bytes) -> int:
    return sum(1 for _ in _sequential_frames(data))


def _decode_sequentially(data: bytes, indices: np.ndarray, size_kwargs: dict) -> np.ndarray:
    wanted = np.bincount(indices, minlength=int(indices.max()) + 1)  # how often each index is sampled
    frames = []
    for position, frame in enumerate(_sequential_frames(data)):
        if position >= len(wanted):
            break
        if wanted[position]:
            array = frame.to_ndarray(format="rgb24", **size_kwargs)
            frames.extend([array] * int(wanted[position]))
    return np.stack(frames)


def _guess_damage(data: bytes) -> str:
    """Why a file that the demuxer rejects is unreadable, judged by its leading bytes."""
    if data[4:8] == b"ftyp":
        return "truncated or corrupt MP4 (the container's index is missing or damaged)"
    if data[:4] == b"\x1aE\xdf\xa3":
        return "truncated or corrupt WebM/Matroska container"
    return "not a video: unrecognised container format"


def _scaled_size(width: int, height: int, short_side: int) -> dict:
    if width <= 0 or height <= 0:
        return {}
    scale = short_side / min(width, height)
    return {"width": max(1, round(width * scale)), "height": max(1, round(height * scale))}


def _short_message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:200] if text else exc.__class__.__name__
