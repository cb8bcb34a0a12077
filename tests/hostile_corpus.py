"""Hostile videos the tests make themselves: bombs by resolution, aspect, frame count and duration, a resolution
change mid-stream, a small decoy stream, and seeded mutations of small real files."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def _write(path: Path, sizes: list[tuple[int, int]], fps: int = 25, fmt: str | None = None,
           pts_step: int | None = None, codec: str = "libx264") -> Path:
    """One frame per entry of `sizes` (all one size: the encoder's), flat grey with a moving block."""
    width, height = sizes[0]
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        if pts_step is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(len(sizes)):
            image = np.full((height, width, 3), (i * 9) % 256, np.uint8)
            image[: min(8, height), (i * 4) % max(1, width - 8):][:, :8] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_step is not None:
                frame.pts, frame.time_base = i * pts_step, Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def resolution_bomb(path: Path) -> Path:
    """4000x2400 (9.6 MP, over the 3840x2160 default), a few KB."""
    return _write(path, [(4000, 2400)] * 2)


def aspect_bomb(path: Path) -> Path:
    """2048x16: cheap to decode, but 128:1, and its short side resized to 224 would be 28,672 px wide."""
    return _write(path, [(2048, 16)] * 4)


def frame_count_bomb(path: Path, frames: int = 600, fps: int = 1000) -> Path:
    """Many tiny frames in a short time (tests set video.max_frames below `frames`)."""
    return _write(path, [(16, 16)] * frames, fps=fps)


def duration_bomb(path: Path) -> Path:
    """Ten frames whose timestamps span 10,000 s (over the one-hour default)."""
    return _write(path.with_suffix(".mkv"), [(32, 32)] * 10, pts_step=1_000_000)


def resolution_change(path: Path) -> Path:
    """An MPEG-TS whose header (first segment) says 64x64, and whose second half is 4000x2400."""
    small, large = path.with_name("small.ts"), path.with_name("large.ts")
    _write(small, [(64, 64)] * 30, fmt="mpegts")
    _write(large, [(4000, 2400)] * 30, fmt="mpegts")
    path.write_bytes(small.read_bytes() + large.read_bytes())
    return path


def decoy_streams(path: Path) -> Path:
    """A small first video stream and a 4000x2400 second one."""
    with av.open(str(path), "w", format="matroska") as out:
        streams = []
        for width, height in ((32, 32), (4000, 2400)):
            stream = out.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"preset": "ultrafast"}
            streams.append(stream)
        for i in range(4):
            for stream in streams:
                frame = av.VideoFrame.from_ndarray(np.full((stream.height, stream.width, 3), i * 30, np.uint8),
                                                   format="rgb24")
                frame.pts = i
                for packet in stream.encode(frame):
                    out.mux(packet)
        for stream in streams:
            for packet in stream.encode():
                out.mux(packet)
    return path


def small_clips(folder: Path) -> list[Path]:
    """4-10 KB H.264, HEVC and MPEG-4 clips, the seeds of the mutations."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for codec, extension in (("libx264", "mp4"), ("libx265", "mkv"), ("mpeg4", "avi")):
        path = folder / f"seed_{codec}.{extension}"
        with av.open(str(path), "w") as out:
            stream = out.add_stream(codec, rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            if codec == "libx265":
                stream.options = {"x265-params": "log-level=none"}
            rng = np.random.default_rng(0)
            for i in range(20):
                image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) // 4 + i * 8
                for packet in stream.encode(av.VideoFrame.from_ndarray(image.astype(np.uint8), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        clips.append(path)
    return clips


def mutations(clips: list[Path], count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """`count` mutants: a few random byte flips, a zeroed run, or a duplicated chunk, past the first 32 bytes."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        clip = clips[k % len(clips)]
        data = bytearray(clip.read_bytes())
        kind = k % 3
        if kind == 0:
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(32, len(data)))] = int(rng.integers(0, 256))
        elif kind == 1:
            start = int(rng.integers(32, len(data) - 64))
            data[start:start + int(rng.integers(8, 64))] = bytes(64)[: len(data[start:start + 64])]
        else:
            start = int(rng.integers(32, len(data) - 256))
            data[start:start] = data[start:start + int(rng.integers(16, 256))]
        out.append((f"{clip.name}#{k}", bytes(data)))
    return out
