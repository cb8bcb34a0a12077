"""The Parquet shard format that preprocessing writes and training and evaluation read.

One row per video. Frames stay uint8 (never float32 pixel values: that is four times the bytes), stored one
encoded image per frame so a reader can decode them on the worker that needs them:

| column            | type           | meaning                                                  |
| ----------------- | -------------- | -------------------------------------------------------- |
| video_id          | string         | VATEX video ID                                           |
| split             | string         | train / validation / test                                |
| frames            | list<binary>   | one encoded frame each, `num_frames` of them, RGB        |
| encoding          | string         | "jpeg", "png" or "raw" (H*W*3 bytes, row-major)         |
| height, width     | int32          | frame size after resize and centre crop                  |
| frame_indices     | list<int64>    | which source frames were sampled                         |
| num_source_frames | int64          | decodable frames in the source video                     |
| captions          | list<string>   | the reference captions (10 for VATEX)                    |

Files are named `<split>-part-<NNNNN>-of-<MMMMM>.parquet` (`shard_file_name`), rows sorted by video ID; a split
is complete when all MMMMM parts are there. `list_shards` finds them locally or on any pyarrow filesystem
(`s3://`, `gs://`). Each file's key-value metadata `stgpt` holds what preprocessing recorded about it (see
`stgpt/preprocessing.py`): which videos of the part failed and why, and which node wrote which rows.
"""
from __future__ import annotations

import io
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image
from pyarrow import fs as pafs

from stgpt import storage
from stgpt.config import VideoConfig

ENCODINGS = ("jpeg", "png", "raw")
FRAME_COLUMNS = ["video_id", "frames", "encoding", "height", "width"]  # what turning a row into frames reads

SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("split", pa.string()),
    ("frames", pa.list_(pa.binary())),
    ("encoding", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("frame_indices", pa.list_(pa.int64())),
    ("num_source_frames", pa.int64()),
    ("captions", pa.list_(pa.string())),
])


SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_-]+)-part-(?P<part>\d{5})-of-(?P<num_parts>\d{5})\.parquet$")


class ShardRowError(ValueError):
    """A shard row whose frames or captions are unusable (wrong shape, undecodable, no captions)."""


def shard_file_name(split: str, part: int, num_parts: int) -> str:
    """`train-part-00003-of-00010.parquet`: which split, which part, and how many parts make the split."""
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} out of range for {num_parts} parts")
    return f"{split}-part-{part:05d}-of-{num_parts:05d}.parquet"


def list_shards(root: str | os.PathLike, split: str, require_complete: bool = True) -> list[str]:
    """The shard files of `split` under `root` (local or a URI), in part order, as paths `read_parquet` takes.

    Local folders give absolute paths, others full URIs. With `require_complete`, a split with parts missing
    (preprocessing interrupted) or with files of two partitionings raises FileNotFoundError saying so.
    """
    root_text = os.fspath(root)
    filesystem, base = storage.filesystem(root_text)
    try:
        listing = filesystem.get_file_info(pafs.FileSelector(base, recursive=False))
    except FileNotFoundError:
        raise FileNotFoundError(f"shard folder {root_text} does not exist") from None
    parts: dict[int, str] = {}
    totals = set()
    for info in listing:
        match = SHARD_NAME.match(info.base_name)
        if info.type == pafs.FileType.File and match and match["split"] == split:
            parts[int(match["part"])] = info.base_name
            totals.add(int(match["num_parts"]))
    if require_complete:
        if not parts:
            raise FileNotFoundError(f"no shards of split {split!r} in {root_text}")
        if len(totals) > 1:
            raise FileNotFoundError(f"{root_text}: split {split!r} has files of {len(totals)} partitionings "
                                    f"(-of-{sorted(totals)}); re-run preprocessing with --overwrite")
        (total,) = totals
        if sorted(parts) != list(range(total)):
            raise FileNotFoundError(f"{root_text}: split {split!r} has {len(parts)} of {total} parts: "
                                    "preprocessing did not finish (re-run it to resume)")
    if storage.is_uri(root_text):
        return [storage.child(root_text, parts[part]) for part in sorted(parts)]
    return [f"{base.rstrip('/')}/{parts[part]}" for part in sorted(parts)]


def encode_frames(frames: np.ndarray, encoding: str = "jpeg", quality: int = 95) -> list[bytes]:
    """uint8 `(T, H, W, 3)` frames to one encoded image each."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.shape} {frames.dtype}")
    if encoding == "raw":
        return [np.ascontiguousarray(f).tobytes() for f in frames]
    out = []
    for frame in frames:
        buf = io.BytesIO()
        if encoding == "jpeg":
            Image.fromarray(frame).save(buf, format="JPEG", quality=quality, subsampling=0)
        else:
            Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


def decode_frames(encoded: Sequence[bytes], encoding: str, height: int, width: int) -> np.ndarray:
    """Encoded frames back to uint8 `(T, H, W, 3)`; raises `ShardRowError` if they do not fit."""
    if encoding not in ENCODINGS:
        raise ShardRowError(f"unknown frame encoding {encoding!r}")
    if len(encoded) == 0:
        raise ShardRowError("row has no frames")
    frames = np.empty((len(encoded), height, width, 3), dtype=np.uint8)
    for i, data in enumerate(encoded):
        if encoding == "raw":
            if len(data) != height * width * 3:
                raise ShardRowError(f"frame {i} has {len(data)} bytes, expected {height}x{width}x3")
            frames[i] = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
            continue
        try:
            image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except Exception as exc:
            raise ShardRowError(f"frame {i} does not decode as {encoding}: {exc}") from None
        if image.shape != (height, width, 3):
            raise ShardRowError(f"frame {i} is {image.shape}, expected {(height, width, 3)}")
        frames[i] = image
    return frames


def row_frames(row: Mapping[str, Any], num_frames: int | None = None) -> np.ndarray:
    """The uint8 frames of one shard row, checked against the expected frame count."""
    frames = decode_frames(list(row["frames"]), row["encoding"], int(row["height"]), int(row["width"]))
    if num_frames is not None and frames.shape[0] != num_frames:
        raise ShardRowError(f"{row.get('video_id')}: {frames.shape[0]} frames, expected {num_frames}")
    return frames


def row_clip(row: Mapping[str, Any], video: VideoConfig) -> np.ndarray:
    """A row's frames as the model takes them: uint8 (T, crop, crop, 3), resized only if stored at another size.
    Raises ShardRowError for frames that do not decode or are not `video.num_frames`."""
    clip = row_frames(row, video.num_frames)
    if clip.shape[1:3] == (video.crop_size, video.crop_size):
        return clip
    from stgpt.transforms import (
        resize_and_crop,  # torch: only for rows stored at another size (decode tasks stay light)
    )

    return resize_and_crop(clip, video.short_side, video.crop_size).numpy()


def row_error(exc: BaseException) -> str:
    """Why a row was skipped, short enough for a log line or an errors file."""
    reason = str(exc) if isinstance(exc, ShardRowError) else f"{type(exc).__name__}: {exc}"
    return reason[:300]
