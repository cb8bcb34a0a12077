"""Video decoding and SpaceTimeGPT's frame sampling: `read_video(source, num_frames)`, exact by default.

The frames returned are, bit for bit before scaling, the frames a full sequential decode of the stream FFmpeg
picks (`best`) yields at the indices `np.linspace(0, n, num_frames, endpoint=False)`, upright as a player shows
them (rotation metadata applied). `n` counts frames the way a decoder outputs them: in presentation order,
packets flagged discard (edit lists) not counted.

Why PyAV: its wheels carry FFmpeg 8 on every platform (AV1 included), and it gives packet flags and timestamps,
so an exact sampler is a few lines: demux once (no decoding) to index the frames by presentation timestamp,
then for each group of targets seek to the keyframe before it, decode up to its last target (skipping
non-reference frames that are not targets) and check every decoded frame's timestamp against the index. Where
the index cannot be trusted (missing or repeated timestamps, reordering the timestamps do not show, damaged
packets) it decodes sequentially instead. decord (`decoder="decord"`, an optional extra) is faster to open but
inexact on B-frames, MPEG-1 and discard-flagged packets; see the README. Measurements: benchmarks/RESULTS.md.

Every failure raises `VideoDecodeError`, which names the video and the reason.
"""
from __future__ import annotations

import bisect
import io
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import av
import numpy as np

from stgpt.config import VideoConfig

VideoSource = Union[str, os.PathLike, bytes]
DECODERS = ("pyav", "decord")

# A file whose decodable frames end before this fraction of its declared duration (and more than
# TRUNCATION_MIN_GAP_S seconds early) is reported as truncated. Audio tracks can outlast the video a little.
TRUNCATION_FRACTION = 0.8
TRUNCATION_MIN_GAP_S = 1.0
# Containers whose seeks are approximate and whose parser interpolates other timestamps after one (MPEG program
# streams): decoded sequentially, which is exact.
SEQUENTIAL_FORMATS = frozenset({"mpeg"})
# Scaling filter used when `short_side` is given (swscale's bilinear widens its kernel when downscaling).
INTERPOLATION = "BILINEAR"


class VideoDecodeError(Exception):
    """A video could not be decoded; `source` names it and `reason` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class VideoLimitError(VideoDecodeError):
    """A video over one of the reading limits of `VideoConfig`; `limit` names it (e.g. "max_pixels")."""

    def __init__(self, source: str, limit: str, reason: str):
        super().__init__(source, f"{reason} (limit: video.{limit})")
        self.limit = limit


@dataclass
class SampledVideo:
    """Frames sampled from one video, with where they came from."""

    frames: np.ndarray  # uint8 (num_frames, H, W, 3), RGB, upright
    indices: np.ndarray  # int64 (num_frames,), indices into the decodable frames
    num_source_frames: int  # decodable frames in the video
    fps: float
    frames_decoded: int = 0  # how many frames the decoder produced to get them (a cost measure)


def sample_indices(num_source_frames: int, num_frames: int = 8) -> np.ndarray:
    """SpaceTimeGPT's rule: `num_frames` evenly spaced indices; short videos repeat frames deterministically."""
    if num_source_frames <= 0:
        raise ValueError(f"cannot sample from {num_source_frames} frames")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    return np.linspace(0, num_source_frames, num_frames, endpoint=False).astype(np.int64)


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Output (height, width) when the shortest edge becomes `short_side`, truncating as transformers does."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


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
    decoder: str = "pyav",
    limits: VideoConfig | None = None,
) -> SampledVideo:
    """Decode `num_frames` evenly sampled frames of a video given as a path or as bytes.

    `short_side` scales frames in the decoder's colour conversion so their shorter edge has that length (aspect
    kept, sizes as `resized_shape`). `name` overrides the name used in errors (useful for bytes). `decoder` is
    "pyav" (exact) or "decord". `limits` (a `VideoConfig`'s max_* and decode_cpu_seconds; its defaults when
    None) bound what the video may cost: over one, `VideoLimitError`. Raises `VideoDecodeError` for every kind
    of bad input.
    """
    label = name or describe_source(source)
    if decoder not in DECODERS:
        raise ValueError(f"video decoder must be one of {DECODERS}, got {decoder!r}")
    source = _checked_source(source, label)
    if decoder == "decord":
        from stgpt import video_decord  # optional dependency, imported only when asked for

        return video_decord.read_video(source, num_frames, label, short_side, num_threads)
    try:
        return _PyAVReader(source, label, short_side, num_threads, limits or VideoConfig()).sample(num_frames)
    except MemoryError:
        raise VideoDecodeError(label, "ran out of memory decoding this video") from None


def sample_video(source: VideoSource, video: VideoConfig, name: str | None = None) -> SampledVideo:
    """`read_video` with a config's settings: its frame count, its decoder, scaled to its short side on decode.

    Every path that turns a video into model input (preprocessing, evaluation, serving, captioning) reads
    through here, so the frames a model trains on and the frames it is served are scaled the same way.
    """
    return read_video(source, video.num_frames, name=name, short_side=video.short_side, decoder=video.decoder,
                      limits=video)


@dataclass
class SampledWindow:
    """The frames sampled from one time window of a video: `video.indices` index the whole video's frames."""

    index: int  # 0, 1, ... in time order
    start_s: float
    end_s: float
    video: SampledVideo


def read_windows(source: VideoSource, video: VideoConfig, window_s: float, stride_s: float | None = None,
                 name: str | None = None) -> Iterator[SampledWindow]:
    """One `SampledWindow` per window of `window_s` seconds, every `stride_s` (default `window_s`), streamed.

    Windows cover the frames' presentation times from the first frame on; in each, `video.num_frames` frames
    are sampled with the original rule among the frames shown in it. A video shorter than a window is one
    window; the last window ends with the video; windows with no frames (gaps) are skipped. Only the frames of
    the window being read are held, so a video of any length reads in the memory of one window. The limits of
    `video` apply; `decode_cpu_seconds` to each window.
    """
    if window_s <= 0 or (stride_s is not None and stride_s <= 0):
        raise ValueError(f"window and stride must be positive, got {window_s} and {stride_s}")
    label = name or describe_source(source)
    if video.decoder != "pyav":
        raise ValueError("windows need the exact reader (video.decoder=pyav)")
    checked = _checked_source(source, label)
    try:
        reader = _PyAVReader(checked, label, video.short_side, 1, video)
        yield from reader.sample_windows(video.num_frames, window_s, stride_s or window_s)
    except MemoryError:
        raise VideoDecodeError(label, "ran out of memory decoding this video") from None


# --------------------------------------------------------------------------------------------------------
# The PyAV reader.


@dataclass
class _Packet:
    pts: int | None
    dts: int | None
    keyframe: bool
    discard: bool
    disposable: bool


class _Untrusted(Exception):
    """The packet index does not describe what the decoder outputs: decode sequentially instead."""


class _PyAVReader:
    def __init__(self, source: str | bytes, label: str, short_side: int | None, num_threads: int,
                 limits: VideoConfig):
        self.source, self.label, self.short_side, self.num_threads = source, label, short_side, num_threads
        self.limits, self.cpu_start = limits, time.thread_time()
        self.decoded, self.context = 0, None
        self.container = container = self._open()  # indexed, then decoded from: sample() closes it
        try:
            self.stream = stream = self._best_stream(container)
            self._check_size(stream.codec_context.width, stream.codec_context.height, "declares")
            if stream.frames and stream.frames > limits.max_frames:
                raise VideoLimitError(label, "max_frames", f"the container declares {stream.frames} frames, over "
                                                           f"the limit of {limits.max_frames}")
            self.fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            self.declared = _declared_duration(container, stream)
            self.start = stream.start_time
            self.packets, self.trusted, self.last_end = self._index(container, stream)
            self.trusted = self.trusted and container.format.name not in SEQUENTIAL_FORMATS
        except BaseException:
            container.close()
            raise
        self.shown = [p.pts for p in self.packets if not p.discard]  # presentation order, if trusted
        if self.trusted:
            self.shown.sort()
            self.trusted = len(set(self.shown)) == len(self.shown)
        self.position = {p.pts: i for i, p in enumerate(self.packets)}  # pts -> place in decode order
        self.timestamps_in_decode_order = all(p.pts == p.dts for p in self.packets)

    # ---- opening and indexing

    def _open(self):
        target = io.BytesIO(self.source) if isinstance(self.source, bytes) else self.source
        try:
            return av.open(target, mode="r")
        except Exception as exc:
            raise VideoDecodeError(self.label, f"{_guess_damage(self._head())} ({_short_message(exc)})") from None

    def _head(self) -> bytes:
        if isinstance(self.source, bytes):
            return self.source[:16]
        with open(self.source, "rb") as handle:
            return handle.read(16)

    def _best_stream(self, container):
        stream = container.streams.best("video")
        if stream is None:
            raise VideoDecodeError(self.label, "no video stream (not a video, or audio only)")
        for other in container.streams:
            if other is not stream:
                other.discard = av.stream.Discard.all  # demux only the stream we decode
        return stream

    def _index(self, container, stream) -> tuple[list[_Packet], bool, float | None]:
        """Every packet of the stream in decode order (no decoding); whether their timestamps can be trusted."""
        packets: list[_Packet] = []
        trusted, last_end, limits = True, None, self.limits
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                packets.append(_Packet(packet.pts, packet.dts, packet.is_keyframe, packet.is_discard,
                                       packet.is_disposable))
                if packet.pts is None or packet.is_corrupt:
                    trusted = False
                elif not packet.is_discard and packet.time_base is not None:
                    end = float((packet.pts + (packet.duration or 0) - (self.start or 0)) * packet.time_base)
                    last_end = end if last_end is None else max(last_end, end)
                    if last_end > limits.max_seconds:
                        raise VideoLimitError(self.label, "max_seconds", f"the video is over {limits.max_seconds:g}s "
                                              f"long by its timestamps ({last_end:.1f}s and counting)")
                if len(packets) > limits.max_frames:
                    raise VideoLimitError(self.label, "max_frames", f"the video has over {limits.max_frames} frames")
                if len(packets) % 256 == 0:
                    self._check_cpu()
        except av.error.FFmpegError:
            trusted = False  # damaged packets: what decodes is counted by decoding
        if packets and trusted and not any(p.keyframe for p in packets):
            trusted = False
        return packets, trusted, last_end

    # ---- sampling

    def sample(self, num_frames: int) -> SampledVideo:
        try:
            self._check_not_truncated()
            if self.trusted and self.shown:
                indices = sample_indices(len(self.shown), num_frames)
                try:
                    frames = self._decode_targets(indices)
                    return self._result(frames, indices, len(self.shown))
                except _Untrusted:
                    pass
        finally:
            self.container.close()
        return self._sample_sequentially(num_frames)

    def sample_windows(self, num_frames: int, window_s: float, stride_s: float) -> Iterator[SampledWindow]:
        try:
            self._check_not_truncated()
            trusted = self.trusted and bool(self.shown)
            if trusted:
                times = self._times()
                windows, yielded = _windows(times, num_frames, window_s, stride_s, self.fps), 0
                try:
                    for index, begin, end, indices in windows:
                        self.cpu_start, self.decoded = time.thread_time(), 0  # the CPU budget is per window
                        frames = self._decode_targets(indices)
                        yield SampledWindow(index, begin, end, self._result(frames, indices, len(self.shown)))
                        yielded += 1
                    return
                except _Untrusted:
                    if yielded:  # pragma: no cover - the first window's decode is where an index shows its faults
                        raise VideoDecodeError(self.label, "the decoder disagreed with the stream's index midway "
                                                           "through its windows") from None
        finally:
            self.container.close()
        times = self._sequential_times()
        if not times:
            raise VideoDecodeError(self.label, "no decodable frames")
        yield from self._windows_sequentially(_windows(times, num_frames, window_s, stride_s, self.fps), len(times))

    def _times(self) -> list[float]:
        """Presentation times of the shown frames, in seconds from the first."""
        base, unit = self.shown[0], float(self.stream.time_base)
        return [(pts - base) * unit for pts in self.shown]

    def _sequential_times(self) -> list[float]:
        times = []
        with self._open() as container:
            stream = self._best_stream(container)
            self._configure(stream)
            try:
                for frame in container.decode(stream):
                    self._check_cpu()
                    times.append(float(frame.time) if frame.time is not None else len(times) / (self.fps or 1.0))
                    if len(times) > self.limits.max_frames:
                        raise VideoLimitError(self.label, "max_frames",
                                              f"the video has over {self.limits.max_frames} frames")
            except av.error.FFmpegError:
                pass
        return [t - times[0] for t in times] if times else []

    def _windows_sequentially(self, windows: list, count: int) -> Iterator[SampledWindow]:
        """One more pass in decode order, yielding each window once its last sampled frame has gone by."""
        pending = {index: (begin, end, indices, {}) for index, begin, end, indices in windows}
        position = 0
        with self._open() as container:
            stream = self._best_stream(container)
            self._configure(stream)
            try:
                for frame in container.decode(stream):
                    self.cpu_start = time.thread_time()
                    for index in sorted(pending):
                        begin, end, indices, taken = pending[index]
                        if position in indices and position not in taken:
                            taken[position] = self._to_rgb(frame)
                        if indices[-1] <= position:
                            del pending[index]
                            yield SampledWindow(index, begin, end, self._result(taken, indices, count,
                                                                                by_position=True))
                    position += 1
            except av.error.FFmpegError:
                pass
        if pending:
            raise VideoDecodeError(self.label, "frames stopped decoding before the last window")

    def _decode_targets(self, indices: np.ndarray) -> dict[int, np.ndarray]:
        """For each group of targets: seek to its keyframe, decode up to its last target, drain the decoder."""
        keyframes = sorted((p.pts, i) for i, p in enumerate(self.packets) if p.keyframe)
        key_pts = [pts for pts, _ in keyframes]
        groups: dict[int, list[int]] = {}
        for target in sorted({int(self.shown[i]) for i in indices}):
            # the last keyframe shown at or before the target (open-GOP leading frames come before theirs)
            key = key_pts[max(0, bisect.bisect_right(key_pts, target) - 1)]
            groups.setdefault(key, []).append(target)
        got: dict[int, np.ndarray] = {}
        if self.context is None:
            self.context = self._configure(self.stream)  # once: a codec's threads are fixed when it opens
        context = self.context
        for key, targets in groups.items():
            self._decode_group(context, dict(keyframes)[key], set(targets), got)
            if not all(t in got for t in targets):
                raise _Untrusted
        return got

    def _decode_group(self, context, key_place: int, pending: set, got: dict) -> None:
        packets = self._seek(context, key_place)
        wanted, last_pts = set(pending), None
        for packet in packets:
            if self.position.get(packet.pts) is None:
                raise _Untrusted
            needed = packet.pts in pending
            if not needed and packet.is_disposable and not packet.is_discard:
                continue  # a non-reference frame nobody asked for: not even sent to the decoder
            context.skip_frame = "DEFAULT" if needed else "NONREF"
            last_pts = self._decode_packet(context, packet, wanted, got, last_pts)
            pending.discard(packet.pts)
            if not pending:
                break
        context.skip_frame = "DEFAULT"
        self._decode_packet(context, None, wanted, got, last_pts)  # drain: frames held back for reordering

    def _seek(self, context, key_place: int) -> Iterator:
        """Packets from the keyframe at `key_place` (or one before it) on. Approximate seeks (MPEG program
        streams) can land after it: then try from earlier keyframes, and at last from the start."""
        earlier = [i for i, p in enumerate(self.packets[:key_place + 1]) if p.keyframe][::-1]
        container, stream = self.container, self.stream
        for attempt in [*earlier[:3], None]:
            if attempt is None:
                container.seek(0)  # the start (AV_TIME_BASE units, no stream)
            else:
                # backward from the key's own pts lands on it (demuxers that seek by dts: on it or before)
                container.seek(self.packets[attempt].pts, backward=True, any_frame=False, stream=stream)
            context.flush_buffers()
            packets = (p for p in container.demux(stream) if p.size)
            for packet in packets:
                if packet.is_keyframe:  # skip to the first keyframe: an approximate seek resynchronises there
                    break
            else:
                raise _Untrusted
            place = self.position.get(packet.pts)
            if place is not None and place <= key_place:
                return itertools.chain([packet], packets)
        raise _Untrusted

    def _decode_packet(self, context, packet, wanted: set, got: dict, last_pts):
        try:
            frames = context.decode(packet)
        except av.error.FFmpegError:
            raise _Untrusted from None  # damaged: count what decodes, sequentially
        self._check_cpu()
        for frame in frames:
            self.decoded += 1
            self._check_size(frame.width, frame.height, "decodes to")
            if frame.pts is None or frame.pts not in self.position or (last_pts is not None and frame.pts <= last_pts):
                raise _Untrusted  # frames out of order, or not the ones the index knows
            last_pts = frame.pts
            if frame.pts in wanted:
                got[frame.pts] = self._to_rgb(frame)
        if context.has_b_frames and self.timestamps_in_decode_order:
            raise _Untrusted  # the decoder reorders but the container's timestamps do not say how (AVI)
        return last_pts

    def _sample_sequentially(self, num_frames: int) -> SampledVideo:
        """Decode every frame in order; the count is what decodes before the first error."""
        guess = len([p for p in self.packets if not p.discard]) or 1
        indices = sample_indices(guess, num_frames)
        count, taken = self._sequential_pass(indices)
        if count == 0:
            raise VideoDecodeError(self.label, "no decodable frames")
        if count != guess:  # the packets did not tell the count: a second pass with the real one
            indices = sample_indices(count, num_frames)
            count, taken = self._sequential_pass(indices)
        return self._result({int(i): taken[int(i)] for i in indices}, indices, count, by_position=True)

    def _sequential_pass(self, indices: np.ndarray) -> tuple[int, dict[int, np.ndarray]]:
        wanted, taken, count = set(int(i) for i in indices), {}, 0
        with self._open() as container:
            stream = self._best_stream(container)
            self._configure(stream)
            try:
                for frame in container.decode(stream):
                    self.decoded += 1
                    self._check_size(frame.width, frame.height, "decodes to")
                    self._check_cpu()
                    if count > self.limits.max_frames:
                        raise VideoLimitError(self.label, "max_frames",
                                              f"the video has over {self.limits.max_frames} frames")
                    if count in wanted:
                        taken[count] = self._to_rgb(frame)
                    count += 1
            except av.error.FFmpegError:
                pass
        return count, taken

    # ---- limits and helpers

    def _check_size(self, width: int, height: int, how: str) -> None:
        limits = self.limits
        if width <= 0 or height <= 0:
            return  # unknown until decoded: checked on every frame
        if width * height > limits.max_pixels:
            raise VideoLimitError(self.label, "max_pixels", f"the video {how} {width}x{height} frames, over the "
                                                            f"limit of {limits.max_pixels} pixels a frame")
        if max(width, height) / min(width, height) > limits.max_aspect_ratio:
            raise VideoLimitError(self.label, "max_aspect_ratio", f"the video {how} {width}x{height} frames, an "
                                  f"aspect ratio over {limits.max_aspect_ratio:g}:1")

    def _check_cpu(self) -> None:
        spent = time.thread_time() - self.cpu_start
        if spent > self.limits.decode_cpu_seconds:
            raise VideoLimitError(self.label, "decode_cpu_seconds", f"decoding took over "
                                  f"{self.limits.decode_cpu_seconds:g} CPU seconds (stopped)")


    def _configure(self, stream):
        context = stream.codec_context
        context.thread_count = max(1, self.num_threads)
        context.thread_type = "SLICE" if self.num_threads > 1 else "NONE"  # frame threads would delay skip_frame
        return context

    def _to_rgb(self, frame) -> np.ndarray:
        """RGB, scaled in the same conversion call, then turned upright as the display matrix says."""
        turns = int(round((frame.rotation or 0) / 90.0)) % 4  # counter-clockwise quarter turns
        kwargs = {}
        if self.short_side is not None:
            sideways = turns % 2 == 1
            upright_h, upright_w = (frame.width, frame.height) if sideways else (frame.height, frame.width)
            height, width = resized_shape(upright_h, upright_w, self.short_side)
            if sideways:
                height, width = width, height
            kwargs = {"width": width, "height": height, "interpolation": INTERPOLATION}
        array = frame.to_ndarray(format="rgb24", **kwargs)
        return np.rot90(array, k=turns) if turns else array

    def _result(self, frames: dict, indices: np.ndarray, count: int, by_position: bool = False) -> SampledVideo:
        keys = [int(i) if by_position else int(self.shown[i]) for i in indices]
        stacked = np.stack([frames[k] for k in keys])
        return SampledVideo(frames=np.ascontiguousarray(stacked, dtype=np.uint8), indices=indices,
                            num_source_frames=count, fps=self.fps, frames_decoded=self.decoded)

    def _check_not_truncated(self) -> None:
        """A file cut short after its header: the packets end well before the duration it declares."""
        declared, end = self.declared, self.last_end
        if not declared or declared <= 0 or end is None:
            return
        if end < TRUNCATION_FRACTION * declared and declared - end > TRUNCATION_MIN_GAP_S:
            raise VideoDecodeError(
                self.label, f"truncated: frames end at {end:.2f}s but the container declares {declared:.2f}s")


def _windows(times: list[float], num_frames: int, window_s: float, stride_s: float,
             fps: float) -> list[tuple[int, float, float, np.ndarray]]:
    """(index, start, end, sampled frame indices) of each window of frames shown at `times` (seconds, sorted)."""
    step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else (1.0 / fps if fps else 0.0)
    duration = times[-1] + step
    windows, start = [], 0.0
    while start < duration or not windows:
        low, high = bisect.bisect_left(times, start), bisect.bisect_left(times, start + window_s)
        if high > low:
            windows.append((len(windows), start, min(start + window_s, duration),
                            low + sample_indices(high - low, num_frames)))
        start += stride_s
    return windows


def _checked_source(source: VideoSource, label: str) -> str | bytes:
    """Bytes as they are; a path checked to be a non-empty regular file (opened by the decoder, not read here)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise VideoDecodeError(label, "empty file (0 bytes)")
        return data
    path = Path(source)
    if not path.exists():
        raise VideoDecodeError(label, "file not found")
    if not path.is_file():
        raise VideoDecodeError(label, "not a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise VideoDecodeError(label, f"cannot read file ({exc.strerror})") from None
    if size == 0:
        raise VideoDecodeError(label, "empty file (0 bytes)")
    return os.fspath(path)


def _declared_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _guess_damage(head: bytes) -> str:
    """Why a file that the demuxer rejects is unreadable, judged by its leading bytes."""
    if head[4:8] == b"ftyp":
        return "truncated or corrupt MP4 (the container's index is missing or damaged)"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "truncated or corrupt WebM/Matroska container"
    return "not a video: unrecognised container format"


def _short_message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:200] if text else exc.__class__.__name__
