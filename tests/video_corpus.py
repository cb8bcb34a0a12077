"""A generated corpus of videos, one per class the reader must handle, and the ground truth to check it against.

Every case is written with PyAV (FFmpeg 8's encoders and muxers), small enough to make in seconds. The truth is
a full sequential decode of the stream FFmpeg picks, frame by frame, turned upright as the display matrix says:
`read_video` must return exactly those frames at the sampled indices.

Frame i shows a pattern that moves with i (gradients, a travelling block, a marker in one corner), so encoders
make real P- and B-frames and any off-by-one frame, or a wrong rotation, shows as a mismatch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


@dataclass(frozen=True)
class Case:
    codec: str
    container: str  # file extension; the muxer follows from it unless `format` is given
    pix_fmt: str = "yuv420p"
    frames: int = 48
    width: int = 96
    height: int = 64
    rate: int = 25
    options: dict = field(default_factory=dict)
    format: str | None = None
    rotation: int | None = None  # display matrix, degrees counter-clockwise
    first_pts: int = 0  # negative: the first frames fall before the edit list and are flagged discard
    frame_times: tuple[int, ...] | None = None  # variable frame rate: pts in 1/1000 s
    decoy_stream: bool = False  # a second, small video stream before the real one


X264 = {"bframes": "3", "g": "12", "preset": "fast"}
X265 = {"x265-params": "bframes=4:keyint=12:min-keyint=12:log-level=none"}
SVT = {"preset": "12", "svtav1-params": "keyint=12"}
MPEG = {"bf": "2", "g": "12"}

CASES: dict[str, Case] = {
    "h264_bframes.mp4": Case("libx264", "mp4", options=X264, frames=96),
    "h264.m4v": Case("libx264", "m4v", options=X264, format="mp4"),
    "h264.mov": Case("libx264", "mov", options=X264),
    "h264.mkv": Case("libx264", "mkv", options=X264),
    "h264.avi": Case("libx264", "avi", options=X264),
    "h264.ts": Case("libx264", "ts", options=X264, format="mpegts"),
    "h264.flv": Case("libx264", "flv", options=X264),
    "h264_444_odd.mp4": Case("libx264", "mp4", pix_fmt="yuv444p", width=97, height=61, options=X264),
    "h264_odd_422.mkv": Case("libx264", "mkv", pix_fmt="yuv422p", width=98, height=46, options=X264),
    "hevc_bframes.mp4": Case("libx265", "mp4", options=X265, frames=96),
    "hevc_bframes.mkv": Case("libx265", "mkv", options=X265),
    "hevc_10bit.mkv": Case("libx265", "mkv", pix_fmt="yuv420p10le", options=X265),
    "hevc_12bit_444.mp4": Case("libx265", "mp4", pix_fmt="yuv444p12le", options=X265),
    "av1.mp4": Case("libsvtav1", "mp4", options=SVT),
    "av1_10bit.mkv": Case("libsvtav1", "mkv", pix_fmt="yuv420p10le", options=SVT),
    "av1.webm": Case("libsvtav1", "webm", options=SVT),
    "vp8.webm": Case("libvpx", "webm", options={"g": "12"}),
    "vp9.webm": Case("libvpx-vp9", "webm", options={"g": "12", "deadline": "realtime", "cpu-used": "8"}),
    "vp9_444.mkv": Case("libvpx-vp9", "mkv", pix_fmt="yuv444p", options={"g": "12", "deadline": "realtime"}),
    "mpeg1.mpg": Case("mpeg1video", "mpg", options=MPEG, format="mpeg"),
    "mpeg2.mpg": Case("mpeg2video", "mpg", options=MPEG, format="vob"),
    "mpeg2.ts": Case("mpeg2video", "ts", options=MPEG, format="mpegts"),
    "mpeg4.avi": Case("mpeg4", "avi", options=MPEG),
    "mpeg4.mp4": Case("mpeg4", "mp4", options=MPEG),
    "gif.gif": Case("gif", "gif", pix_fmt="rgb8", frames=24, rate=10),
    "rotate90.mp4": Case("libx264", "mp4", options=X264, rotation=90),
    "rotate180.mov": Case("libx264", "mov", options=X264, rotation=180),
    "rotate270.mp4": Case("libx264", "mp4", options=X264, rotation=-90),
    "discard.mp4": Case("libx264", "mp4", options=X264, first_pts=-7),
    "start_time.mp4": Case("libx264", "mp4", options=X264, first_pts=30),
    "vfr.mkv": Case("libx264", "mkv", options=X264, frame_times=tuple(
        int(t) for t in np.cumsum([0] + [(17, 33, 50, 100)[i % 4] for i in range(47)]))),
    "two_streams.mkv": Case("libx264", "mkv", options=X264, decoy_stream=True),
}


def picture(i: int, height: int, width: int) -> np.ndarray:
    """Frame i: gradients that drift with i, a block that travels, a white marker in the top-left corner."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = (x * 3 + i * 7) % 256
    image[..., 1] = (y * 5 + i * 3) % 256
    image[..., 2] = ((x + y + i * 11) % 64) * 4
    left = (i * 5) % max(1, width - 16)
    image[height // 2: height // 2 + 12, left:left + 12] = (255, 0, 0)
    image[:8, :8] = 255
    return image


def write_case(path: Path, case: Case) -> Path:
    with av.open(str(path), "w", format=case.format) as out:
        decoy = None
        if case.decoy_stream:
            decoy = out.add_stream("libx264", rate=case.rate)
            decoy.width, decoy.height, decoy.pix_fmt = 32, 32, "yuv420p"
        stream = out.add_stream(case.codec, rate=case.rate)
        stream.width, stream.height, stream.pix_fmt = case.width, case.height, case.pix_fmt
        if case.options:
            stream.options = dict(case.options)
        if case.rotation is not None:
            stream.set_display_rotation(case.rotation)
        if case.frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(case.frames):
            frame = av.VideoFrame.from_ndarray(picture(i, case.height, case.width), format="rgb24")
            if case.frame_times is not None:
                frame.pts, frame.time_base = case.frame_times[i], Fraction(1, 1000)
            else:
                frame.pts = i + case.first_pts
            for packet in stream.encode(frame):
                out.mux(packet)
            if decoy is not None:
                small = av.VideoFrame.from_ndarray(picture(i, 32, 32), format="rgb24")
                small.pts = i
                for packet in decoy.encode(small):
                    out.mux(packet)
        for encoder in (stream, decoy) if decoy is not None else (stream,):
            for packet in encoder.encode():
                out.mux(packet)
    return path


def write_corpus(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {name: write_case(folder / name, case) for name, case in CASES.items()}


def upright(frame, **scale) -> np.ndarray:
    array = frame.to_ndarray(format="rgb24", **scale)
    turns = int(round((frame.rotation or 0) / 90.0)) % 4
    return np.rot90(array, k=turns) if turns else array


def sequential_frames(path) -> list[np.ndarray]:
    """The truth: every frame a full sequential decode of FFmpeg's best video stream yields, upright."""
    with av.open(str(path)) as container:
        stream = container.streams.best("video")
        return [upright(frame) for frame in container.decode(stream)]
