"""Shard rows as training data: the columns read, Ray Data over a split's shards, and batches of frames + labels.

Rows travel still JPEG-encoded, a quarter of the bytes of uint8 frames, and are decoded by the worker that
trains on them (`collate_rows`, in Ray Data's prefetch threads) with `shards.row_clip`, the function evaluation's
decode stage uses too, so both see the same pixels. Bad rows (frames that do not decode or have
the wrong count, no captions) are skipped and reported, never fatal.

Captions: a video has ~10. Each epoch pairs every video with one caption drawn by a seeded generator keyed on
(seed, epoch, video ID), so the draw does not depend on which worker got the video or in which order;
`expand_captions` is the original's every caption, every epoch (one row per caption).
"""
from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from stgpt import storage
from stgpt.config import Config, VideoConfig
from stgpt.model import tokenize_captions
from stgpt.shards import FRAME_COLUMNS, ShardRowError, list_shards, row_clip, row_error

SHARD_COLUMNS = [*FRAME_COLUMNS, "captions"]  # what training reads
MAX_CAPTION_TOKENS = 64
VALIDATION_EPOCH = -1  # validation uses one fixed caption per video, so val loss is comparable across epochs


def split_paths(cfg: Config, split: str, required: bool = True) -> list[str]:
    """The split's shard files, or [] for an optional split that preprocessing did not write."""
    try:
        return list_shards(cfg.data.shards, split)
    except FileNotFoundError:
        if required:
            raise
        return []


def caption_index(seed: int, epoch: int, video_id: str, num_captions: int) -> int:
    """Which caption a video gets in an epoch: a pure function of (seed, epoch, video ID), so it is the same on
    any worker, in any order, and after a resume."""
    rng = np.random.default_rng([seed, epoch + 1, zlib.crc32(video_id.encode("utf-8"))])
    return int(rng.integers(num_captions))


def shard_dataset(paths: Sequence[str], expand_captions: bool = False):
    """A lazy Ray Dataset of shard rows, frames still JPEG (nothing is read until a worker iterates).

    Rows cross the object store encoded (a quarter of the bytes of uint8 frames) and are decoded by the worker
    that trains on them, in Ray Data's prefetch threads (`collate_rows`), so no extra processes or stages are
    needed and decoding overlaps the training step. `expand_captions` makes one row per caption.
    """
    # Ray 2.60's default Parquet reader (datasource V2) starts 32 footer-reader actors each time a dataset runs,
    # i.e. every epoch: 10-45 s per epoch on a 2-core machine, against 0.1 s for the V1 reader (measured on one
    # shard). The choice is made when the dataset is created, so V1 is switched on for this call only.
    context = ray.data.DataContext.get_current()
    default, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        dataset = ray.data.read_parquet(list(paths)).select_columns(SHARD_COLUMNS)
    finally:
        context.use_datasource_v2 = default
    return dataset.flat_map(_one_row_per_caption()) if expand_captions else dataset


def _one_row_per_caption() -> Callable[[dict], list[dict]]:
    # Made in a factory so Ray pickles the function by value: its tasks then never import this module (and
    # torch with it), which costs seconds in every fresh Ray worker process.
    def one_row_per_caption(row: dict) -> list[dict]:
        captions = [c for c in (row["captions"] if row["captions"] is not None else []) if c and c.strip()]
        return [{**row, "captions": [c]} for c in captions] or [row]  # a row without captions stays, to be counted

    return one_row_per_caption


@dataclass
class Batch:
    """One worker's batch, on the CPU: uint8 frames, labels, and which rows were usable or bad."""

    frames: torch.Tensor  # uint8 (B, T, H, W, 3): normalised on the device, in the step
    labels: torch.Tensor
    decoder_attention_mask: torch.Tensor
    video_ids: list[str]
    references: list[list[str]]  # every caption of each kept video (for CIDEr)
    num_ok: int
    bad: list[tuple[str, str]]  # (video ID, reason) of rows skipped


def collate_rows(rows: Mapping[str, Sequence], tokenizer, video: VideoConfig, seed: int, epoch: int) -> Batch:
    """Shard rows (columns of `SHARD_COLUMNS`) to a training batch: decode frames, drop bad rows, draw each video's
    caption for `epoch`, tokenise. Runs in Ray Data's prefetch threads (`iter_torch_batches(collate_fn=...)`).

    A bad row (frames that do not decode or are not `video.num_frames`, no captions) is skipped and reported in
    `bad`, never raised. A batch with no usable row becomes one blank row with `num_ok == 0`, which the loop
    trains with weight 0: every DDP worker must run the same number of backward passes.
    """
    ids, frames, references, texts, bad = [], [], [], [], []
    for i, video_id in enumerate(rows["video_id"]):
        row = {name: rows[name][i] for name in SHARD_COLUMNS}
        try:
            captions = [c.strip() for c in (row["captions"] if row["captions"] is not None else []) if c and c.strip()]
            if not captions:
                raise ShardRowError("no captions")
            clip = row_clip(row, video)
        except Exception as exc:  # ShardRowError, or anything odd in one row: skip it, do not fail the run
            bad.append((str(video_id), row_error(exc)))
            continue
        ids.append(str(video_id))
        frames.append(clip)
        references.append(captions)
        texts.append(captions[caption_index(seed, epoch, str(video_id), len(captions))])
    num_ok = len(ids)
    if not num_ok:
        frames, texts = [np.zeros((video.num_frames, video.crop_size, video.crop_size, 3), np.uint8)], [""]
    labels = _labels(tokenizer, texts)
    mask = torch.ones_like(labels)
    mask[:, 1:] = labels[:, :-1] != -100  # decoder inputs are the labels shifted right behind the start token
    return Batch(torch.from_numpy(np.stack(frames)), labels, mask, ids, references, num_ok, bad)


def table_columns(table: pa.Table) -> dict[str, list]:
    """A pyarrow table as the column mapping `collate_rows` takes (for reading shards without Ray)."""
    return {name: table[name].to_pylist() for name in SHARD_COLUMNS}


def read_captions(paths: Sequence[str]) -> dict[str, list[str]]:
    """video ID -> captions of shard files, reading only those two columns (for the tokenizer and the counts)."""
    out: dict[str, list[str]] = {}
    for path in paths:
        with storage.open_input(path) as handle:
            table = pq.read_table(handle, columns=["video_id", "captions"])
        for video_id, texts in zip(table["video_id"].to_pylist(), table["captions"].to_pylist()):
            out[video_id] = [t for t in (texts or []) if t and t.strip()]
    return out


_TOKENIZER_LOCK = threading.Lock()  # a fast tokenizer sets truncation on its shared backend: one thread at a time


def _labels(tokenizer, texts: list[str]) -> torch.Tensor:
    with _TOKENIZER_LOCK:
        return tokenize_captions(tokenizer, texts, max_length=MAX_CAPTION_TOKENS)
