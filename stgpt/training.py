"""Fine-tune SpaceTimeGPT with Ray Train: DDP over workers and GPUs, data streamed from the Parquet shards.

Read top to bottom: the data (Ray Data over the shards), the training state (what a checkpoint holds), the loop
that runs on every worker (`train_func`), and the driver (`run_training`).

Data. Ray Data reads the split's shards (`read_parquet`) and Ray Train gives each worker a streaming split of
them: rows are read in blocks and handed over as the worker asks, so no worker holds the dataset in memory.
Rows travel still JPEG-encoded; the worker decodes them in Ray Data's prefetch threads (`collate_rows` as the
`collate_fn` of `iter_torch_batches`), overlapping the training step. Bad rows (frames that do not decode or
have the wrong count, no captions) are skipped and counted, never fatal. Frames stay uint8 until the step,
where `to_pixel_values` normalises them on the worker's device.

Captions. A video has ~10 captions. By default each epoch pairs every video with one caption drawn by a seeded
generator keyed on (seed, epoch, video ID), so an epoch costs one pass over the videos and the draw does not
depend on which worker got the video or in which order; `train.all_captions_each_epoch=true` is the
original's every caption, every epoch (Ray Data emits one row per caption).

Checkpoints. Rank 0 writes the self-contained Hugging Face layout of `stgpt.model.save_checkpoint` plus
`training_state.pt` (optimiser, scheduler, grad scaler, progress, RNG states) and registers it with
`ray.train.report`; Ray keeps the best `train.keep_checkpoints` by `train.checkpoint_metric` (and always the
latest). A restarted worker group (`FailureConfig(max_failures)`) or a re-run with the same `train.output_dir`
resumes from the latest one: weights, optimiser, scheduler, scaler, epoch and data position (batches done in
the epoch; each worker skips that many, so a resumed epoch still costs one pass). At the end the best one is
copied, without the training state, to `<train.output_dir>/best`: a plain Hugging Face checkpoint directory.

Outputs under `train.output_dir`: `best/` (the job's output), `tokenizer/` (tiny model), `tensorboard/` (event
files: loss, learning rate, samples/s every `train.log_every` steps and per epoch), `ray/` (Ray Train's run
folder: its checkpoints and state, what resuming reads) and `summary.json`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from stgpt.checkpoints import BEST_DIR
from stgpt.config import Config, VideoConfig
from stgpt.device import autocast, resolve_precision
from stgpt.encoder import apply_encoder_options
from stgpt.model import (build_model, generation_config, load_checkpoint, save_checkpoint, tokenize_captions,
                         train_tokenizer)
from stgpt.resources import Heartbeat, Watchdog, fit_training, heartbeat_probe
from stgpt.shards import ShardRowError, list_shards, row_frames
from stgpt.transforms import resize_and_crop, to_pixel_values

STATE_FILE = "training_state.pt"  # optimiser, scheduler, scaler, progress: in Ray's checkpoints, not in best/
PROGRESS_FILE = "epochs.jsonl"  # one line of metrics per finished epoch, appended by rank 0 (EpochProgress)
HEARTBEAT_FILE = ".heartbeat"  # touched by rank 0 as steps finish, for the driver's stall watchdog
RUN_NAME = "ray"  # Ray Train's run folder under train.output_dir; a fixed name is what makes re-runs resume
SHARD_COLUMNS = ["video_id", "frames", "encoding", "height", "width", "captions"]
MAX_CAPTION_TOKENS = 64

Hook = Callable[[dict], None]


# ----------------------------------------------------------------------------------------------------------
# Data: shards -> Ray Data -> uint8 frames and captions


def caption_index(seed: int, epoch: int, video_id: str, num_captions: int) -> int:
    """Which caption a video gets in an epoch: a pure function of (seed, epoch, video ID), so it is the same on
    any worker, in any order, and after a resume."""
    rng = np.random.default_rng([seed, epoch + 1, zlib.crc32(video_id.encode("utf-8"))])
    return int(rng.integers(num_captions))


VALIDATION_EPOCH = -1  # validation uses one fixed caption per video, so val loss is comparable across epochs


def shard_dataset(paths: Sequence[str], expand_captions: bool = False):
    """A lazy Ray Dataset of shard rows, frames still JPEG (nothing is read until a worker iterates).

    Rows cross the object store encoded (a quarter of the bytes of uint8 frames) and are decoded by the worker
    that trains on them, in Ray Data's prefetch threads (`collate_rows`), so no extra processes or stages are
    needed and decoding overlaps the training step. `expand_captions` makes one row per caption.
    """
    import ray

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
            clip = row_frames(row, video.num_frames)
            if clip.shape[1:3] != (video.crop_size, video.crop_size):
                clip = resize_and_crop(clip, video.short_side, video.crop_size).numpy()
        except Exception as exc:  # ShardRowError, or anything odd in one row: skip it, do not fail the run
            reason = str(exc) if isinstance(exc, ShardRowError) else f"{type(exc).__name__}: {exc}"
            bad.append((str(video_id), reason[:300]))
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
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    out: dict[str, list[str]] = {}
    for path in paths:
        filesystem, inner = pafs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))
        with filesystem.open_input_file(inner) as handle:
            table = pq.read_table(handle, columns=["video_id", "captions"])
        for video_id, texts in zip(table["video_id"].to_pylist(), table["captions"].to_pylist()):
            out[video_id] = [t for t in (texts or []) if t and t.strip()]
    return out


_TOKENIZER_LOCK = threading.Lock()  # a fast tokenizer sets truncation on its shared backend: one thread at a time


def _labels(tokenizer, texts: list[str]) -> torch.Tensor:
    with _TOKENIZER_LOCK:
        return tokenize_captions(tokenizer, texts, max_length=MAX_CAPTION_TOKENS)


class TimedIterator:
    """Wraps an iterator and adds up the time spent waiting in `next()`: how long the loop waited for data."""

    def __init__(self, iterable: Iterable):
        self.iterator, self.seconds = iter(iterable), 0.0

    def __iter__(self) -> "TimedIterator":
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - start


def lookahead(iterable: Iterable) -> Iterator[tuple[Any, bool]]:
    """(item, is_last) pairs: the loop must know the epoch's last batch to end a gradient-accumulation group."""
    iterator = iter(iterable)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for upcoming in iterator:
        yield current, False
        current = upcoming
    yield current, True


# ----------------------------------------------------------------------------------------------------------
# Optimiser, schedule and the training state a checkpoint holds


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm weights (1-D parameters), as Hugging Face's Trainer does."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up to the peak learning rate over `warmup_ratio` of the steps, then linear decay to zero."""
    total = max(1, total_steps)
    warmup = int(round(warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Progress:
    """Where training is: the epoch being run, the batches of it already done, optimiser steps so far."""

    epoch: int = 0
    batch: int = 0  # batches (per worker) of `epoch` already trained: the data position inside the epoch
    step: int = 0


def save_training_state(directory: str | Path, optimizer, scheduler, scaler, progress: Progress) -> None:
    """Write what resuming needs besides the weights: optimiser, scheduler, scaler, progress and RNG states."""
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": dataclasses.asdict(progress),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }, Path(directory) / STATE_FILE)


def load_training_state(directory: str | Path, optimizer, scheduler, scaler) -> Progress:
    """Restore `save_training_state`'s objects in place; returns the progress to continue from."""
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return Progress(**state["progress"])


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int, grad_accum_steps: int) -> int:
    """Optimiser steps in one epoch: Ray splits the samples equally over the workers (dropping the remainder)."""
    batches = math.ceil((num_samples // world_size) / batch_size)
    return math.ceil(batches / grad_accum_steps)


# ----------------------------------------------------------------------------------------------------------
# The loop: runs on every Ray Train worker


def train_func(config: dict) -> dict:
    """Ray Train's per-worker function. `config`: `cfg` (Config), `tokenizer_files` (name -> text, for the tiny
    model's tokenizer), `num_train_samples`, `has_validation`, `hooks` (callables run after each optimiser step
    with the progress, e.g. fault injection in tests). Returns where this attempt started and ended."""
    import ray.train
    import ray.train.torch

    cfg: Config = config["cfg"]
    t = cfg.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    precision = resolve_precision(t.precision, device)
    _seed_everything(t.seed)

    # Model, optimiser, schedule: fresh, or restored from the latest checkpoint (a restarted worker group or a
    # re-run with the same output_dir); the checkpoint holds the tokenizer and the architecture too.
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as resume_dir:
        resume_dir = Path(resume_dir) if resume_dir else None
        captioner = _worker_model(cfg, config.get("tokenizer_files"), resume_dir)
        apply_encoder_options(captioner.model, cfg.encoder)
        model = ray.train.torch.prepare_model(captioner.model, parallel_strategy="ddp" if world > 1 else None)
        raw_model = model.module if hasattr(model, "module") else model
        optimizer = make_optimizer(raw_model, t.lr, t.weight_decay)
        per_epoch = steps_per_epoch(config["num_train_samples"], world, t.batch_size, t.grad_accum_steps)
        total_steps = min(per_epoch * t.epochs, t.max_steps) if t.max_steps else per_epoch * t.epochs
        scheduler = make_scheduler(optimizer, total_steps, t.warmup_ratio)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        progress = load_training_state(resume_dir, optimizer, scheduler, scaler) if resume_dir else Progress()
    tokenizer = captioner.tokenizer
    started = {"resumed": resume_dir is not None, **dataclasses.asdict(progress),
               "scheduler_step": int(scheduler.last_epoch), "lr": scheduler.get_last_lr()[0],
               "optimizer_state_entries": len(optimizer.state)}

    writer = _tensorboard(t.output_dir, progress.step) if rank == 0 else None
    log = Logger(rank, world, writer, device, Path(t.output_dir) / PROGRESS_FILE if rank == 0 else None)
    train_data = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("validation") if config.get("has_validation") else None
    hooks: Sequence[Hook] = config.get("hooks") or ()
    unscored = _worst(t.checkpoint_metric)  # mid-epoch checkpoints rank below every epoch-end one

    for epoch in range(progress.epoch, t.epochs):
        if t.max_steps and progress.step >= t.max_steps:
            break
        skip = progress.batch if epoch == progress.epoch else 0
        progress = Progress(epoch, skip, progress.step)
        model.train()
        epoch_start, epoch_samples = time.perf_counter(), 0
        epoch_loss = RunningMean()
        micro = 0  # batches in the current accumulation group
        stopped_mid_epoch = False  # by train.max_steps: a resume with a larger limit continues this epoch
        batches = TimedIterator(train_data.iter_torch_batches(
            batch_size=t.batch_size, prefetch_batches=2,
            collate_fn=functools.partial(collate_rows, tokenizer=tokenizer, video=cfg.video, seed=t.seed, epoch=epoch),
            local_shuffle_buffer_size=t.shuffle_buffer or None,
            local_shuffle_seed=t.seed * 100_003 + epoch * 1_009 + rank,
        ))
        for index, (batch, is_last) in enumerate(lookahead(batches)):
            if index < skip:  # resuming mid-epoch: these batches were trained before the checkpoint
                continue
            log.bad_rows(batch.bad)
            micro += 1
            ends_group = micro == t.grad_accum_steps or is_last
            sync = model.no_sync() if world > 1 and not ends_group else contextlib.nullcontext()
            with sync:
                with autocast(device, precision):
                    loss = forward(model, batch, cfg.video, device)
                weight = 1.0 if batch.num_ok else 0.0  # an all-bad batch still runs backward, contributing 0
                scaler.scale(loss * weight / t.grad_accum_steps).backward()
            if batch.num_ok:
                log.add_train(loss.item(), batch.num_ok)
                epoch_loss.add(loss.item())
            epoch_samples += batch.num_ok
            progress.batch = index + 1
            if not ends_group:
                continue
            micro = 0
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress.step += 1
            if progress.step % t.log_every == 0:
                log.report_train(progress, scheduler.get_last_lr()[0])
            if t.checkpoint_every_steps and progress.step % t.checkpoint_every_steps == 0 and not is_last:
                _report_checkpoint(rank, raw_model, captioner, optimizer, scheduler, scaler, progress,
                                   {"epoch": epoch, "step": progress.step, t.checkpoint_metric: unscored,
                                    "mid_epoch": True})
            for hook in hooks:
                hook({"rank": rank, "world_size": world, **dataclasses.asdict(progress)})
            if t.max_steps and progress.step >= t.max_steps:  # every worker stops at the same step
                stopped_mid_epoch = not is_last
                break

        # End of epoch: validation, metrics, checkpoint.
        seconds = time.perf_counter() - epoch_start
        metrics = {"epoch": epoch, "step": progress.step, "lr": scheduler.get_last_lr()[0],
                   **log.epoch_train(epoch_loss, epoch_samples, seconds, batches.seconds)}
        if val_data is not None:
            metrics.update(validate(model, captioner, val_data, device, precision, cfg, log))
        metrics.update(log.epoch_health())
        if rank == 0 and t.checkpoint_metric not in metrics:  # rank 0's metrics are the checkpoint's
            raise KeyError(f"train.checkpoint_metric={t.checkpoint_metric!r} is not among the epoch metrics "
                           f"{sorted(metrics)}")
        log.write_epoch(metrics, progress.step)
        progress = Progress(epoch, progress.batch, progress.step) if stopped_mid_epoch else Progress(
            epoch + 1, 0, progress.step)
        _report_checkpoint(rank, raw_model, captioner, optimizer, scheduler, scaler, progress, metrics)

    if writer is not None:
        writer.close()
    return {"started": started, "finished": dataclasses.asdict(progress), "world_size": world}


def forward(model, batch: Batch, video: VideoConfig, device: torch.device) -> torch.Tensor:
    """The captioning loss of a batch: frames go to the device as uint8 and are normalised there."""
    pixel_values = to_pixel_values(batch.frames.to(device, non_blocking=True), video)
    return model(pixel_values=pixel_values, labels=batch.labels.to(device, non_blocking=True),
                 decoder_attention_mask=batch.decoder_attention_mask.to(device, non_blocking=True)).loss


@torch.no_grad()
def validate(model, captioner, val_data, device: torch.device, precision: str, cfg: Config,
             log: "Logger") -> dict[str, float]:
    """Token-weighted validation loss over every worker's share, and CIDEr-D of generated captions on up to
    `train.val_cider_videos` videos when asked (gathered and scored on rank 0)."""
    model.eval()
    t = cfg.train
    raw = model.module if hasattr(model, "module") else model
    totals = torch.zeros(2, dtype=torch.float64)  # loss * tokens, tokens
    predictions: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    cider_quota = math.ceil(t.val_cider_videos / log.world) if t.val_cider_videos else 0
    collate = functools.partial(collate_rows, tokenizer=captioner.tokenizer, video=cfg.video, seed=t.seed,
                                epoch=VALIDATION_EPOCH)
    for batch in val_data.iter_torch_batches(batch_size=t.batch_size, prefetch_batches=2, collate_fn=collate):
        log.bad_rows(batch.bad, validation=True)
        if not batch.num_ok:
            continue
        with autocast(device, precision):
            loss = forward(raw, batch, cfg.video, device)
        tokens = int((batch.labels != -100).sum())
        totals += torch.tensor([loss.item() * tokens, tokens], dtype=torch.float64)
        if len(predictions) < cider_quota:
            take = min(batch.num_ok, cider_quota - len(predictions))
            pixel_values = to_pixel_values(batch.frames[:take].to(device), cfg.video)
            with autocast(device, precision):
                output = raw.generate(pixel_values=pixel_values)
            texts = captioner.tokenizer.batch_decode(output, skip_special_tokens=True)
            for video_id, text, refs in zip(batch.video_ids, texts, batch.references):
                predictions[video_id] = text.strip()
                references[video_id] = refs
    totals = log.all_reduce(totals)
    out = {"val_loss": float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")}
    if t.val_cider_videos:
        out.update(_cider(log, predictions, references))
    model.train()
    return out


def _cider(log: "Logger", predictions: dict, references: dict) -> dict[str, float]:
    gathered = log.gather((predictions, references))
    if log.rank != 0:
        return {}
    try:
        from stgpt.metrics import CIDER_D, score_captions
    except ImportError:
        print("val_cider: stgpt.metrics is not available; skipping CIDEr-D", file=sys.stderr)
        return {}
    all_predictions = {k: v for p, _ in gathered for k, v in p.items()}
    all_references = {k: v for _, r in gathered for k, v in r.items()}
    if not all_predictions:
        return {}
    report = score_captions(all_predictions, all_references, metrics=[CIDER_D])
    return {"val_cider": float(report.corpus[CIDER_D]), "val_cider_videos": len(all_predictions)}


class RunningMean:
    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, value: float, weight: int = 1) -> None:
        self.total += value * weight
        self.count += weight

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


class Logger:
    """Metrics across workers: sums them with all-reduce, reports through `ray.train.report` (every worker must
    call it, it is a barrier) and writes TensorBoard events on rank 0."""

    def __init__(self, rank: int, world: int, writer, device: torch.device, progress_file: Path | None = None):
        self.rank, self.world, self.writer, self.device = rank, world, writer, device
        self.progress_file = progress_file  # rank 0 appends each epoch's metrics here, for the driver to show
        self.loss, self.samples, self.since = RunningMean(), 0, time.perf_counter()
        self.num_bad = {"train": 0, "validation": 0}
        self.shown_bad = 0

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world == 1:
            return values
        import torch.distributed as dist

        on_device = values.to(self.device) if dist.get_backend() == "nccl" else values
        dist.all_reduce(on_device, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return on_device.cpu()

    def gather(self, value: Any) -> list:
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def bad_rows(self, bad: list[tuple[str, str]], validation: bool = False) -> None:
        self.num_bad["validation" if validation else "train"] += len(bad)
        for video_id, reason in bad:
            if self.shown_bad < 20:
                print(f"skipping bad shard row {video_id!r}: {reason}", file=sys.stderr)
            self.shown_bad += 1

    def add_train(self, loss: float, samples: int) -> None:
        self.loss.add(loss)
        self.samples += samples

    def report_train(self, progress: Progress, lr: float) -> None:
        import ray.train

        values = self.all_reduce(torch.tensor([self.loss.total, self.loss.count, self.samples], dtype=torch.float64))
        now = time.perf_counter()
        seconds, self.since = now - self.since, now  # the report below counts in the next window: it is a barrier
        metrics = {"epoch": progress.epoch, "step": progress.step, "lr": lr,
                   "train_loss": float(values[0] / values[1]) if values[1] else float("nan"),
                   "samples_per_s": float(values[2]) / seconds if seconds > 0 else 0.0}
        self._write("step", metrics, progress.step)
        ray.train.report(metrics)
        self.loss, self.samples = RunningMean(), 0

    def epoch_train(self, loss: RunningMean, samples: int, seconds: float, data_wait: float) -> dict[str, float]:
        """Epoch loss and throughput over all workers; `data_wait_seconds`: the longest any worker waited for its
        next batch (Ray Data's start of the epoch included), the part of the epoch the input pipeline cost."""
        values = self.all_reduce(torch.tensor([loss.total, loss.count, samples], dtype=torch.float64))
        slowest = self.all_reduce(torch.tensor([seconds, data_wait], dtype=torch.float64), op="max")
        return {"train_loss": float(values[0] / values[1]) if values[1] else float("nan"),
                "samples": int(values[2]), "epoch_seconds": float(slowest[0]), "data_wait_seconds": float(slowest[1]),
                "samples_per_s": float(values[2]) / float(slowest[0]) if slowest[0] > 0 else 0.0}

    def epoch_health(self) -> dict[str, float]:
        """Bad rows skipped this epoch (all workers) and the peak memory of the most loaded worker."""
        bad = self.all_reduce(torch.tensor([self.num_bad["train"], self.num_bad["validation"]], dtype=torch.float64))
        peak = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0]  # KiB on Linux -> MiB
        if self.device.type == "cuda":
            peak.append(torch.cuda.max_memory_allocated(self.device) / 2**20)
        else:
            peak.append(0.0)
        peak_max = self.all_reduce(torch.tensor(peak, dtype=torch.float64), op="max")
        self.num_bad = {"train": 0, "validation": 0}
        return {"bad_rows": int(bad[0]), "val_bad_rows": int(bad[1]), "peak_rss_mb": float(peak_max[0]),
                "peak_gpu_mb": float(peak_max[1])}

    def write_epoch(self, metrics: dict, step: int) -> None:
        self._write("epoch", metrics, step)
        if self.progress_file is not None:  # the driver shows it (EpochProgress)
            with open(self.progress_file, "a", encoding="utf-8") as out:
                out.write(json.dumps(metrics) + "\n")

    def _write(self, prefix: str, metrics: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step") and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()


def _report_checkpoint(rank: int, raw_model, captioner, optimizer, scheduler, scaler, progress: Progress,
                       metrics: dict) -> None:
    """Rank 0 writes the checkpoint and every worker reports (Ray's report is a barrier)."""
    import ray.train

    name = f"checkpoint-{progress.step:07d}"  # trainer_state.json inside says which epoch and batch
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="stgpt-ckpt-") as tmp:
        save_checkpoint(dataclasses.replace(captioner, model=raw_model), tmp)
        save_training_state(tmp, optimizer, scheduler, scaler, progress)
        (Path(tmp) / "trainer_state.json").write_text(json.dumps({"progress": dataclasses.asdict(progress),
                                                                  "metrics": metrics}, indent=1, default=float))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def _worker_model(cfg: Config, tokenizer_files: dict[str, str] | None, resume_dir: Path | None):
    """The model to train on this worker: from the checkpoint being resumed, else as the config says (with the
    tokenizer the driver trained, shipped as file contents so workers need no shared disk)."""
    if resume_dir is not None:
        captioner = load_checkpoint(resume_dir, num_frames=cfg.video.num_frames)
        captioner = dataclasses.replace(captioner, video=cfg.video)
        captioner.model.generation_config = generation_config(cfg.generation, captioner.tokenizer)
        return captioner
    if tokenizer_files:
        folder = Path(tempfile.mkdtemp(prefix="stgpt-tokenizer-"))
        for name, text in tokenizer_files.items():
            (folder / name).write_text(text, encoding="utf-8")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tokenizer=str(folder)))
    torch.manual_seed(cfg.train.seed)  # same initial weights on every worker (DDP also broadcasts rank 0's)
    return build_model(cfg)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _worst(metric: str) -> float:
    # finite: Ray stores checkpoint metrics as JSON
    return 1e30 if metric_mode(metric) == "min" else -1e30


def metric_mode(metric: str) -> str:
    """Losses are minimised, everything else (CIDEr-D, accuracies) maximised."""
    return "min" if metric.endswith("loss") else "max"


def _tensorboard(output_dir: str, step: int):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops the events a crashed attempt logged after the checkpoint we resume from (at `step`)
    return SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=step + 1 if step else None)


# ----------------------------------------------------------------------------------------------------------
# The driver


@dataclass
class TrainResult:
    """What a run produced: the exported best checkpoint, its metrics, the last epoch's, and Ray's result."""

    best_dir: Path | None
    best_metrics: dict[str, Any]
    last_metrics: dict[str, Any]
    ray_path: str
    seconds: float
    return_value: dict | None = None
    ray_result: Any = field(default=None, repr=False)


def split_paths(cfg: Config, split: str, required: bool = True) -> list[str]:
    """The split's shard files, or [] for an optional split that preprocessing did not write."""
    try:
        return list_shards(cfg.data.shards, split)
    except FileNotFoundError:
        if required:
            raise
        return []


def prepare_tokenizer(cfg: Config, captions: Iterable[str], output_dir: Path) -> dict[str, str] | None:
    """For the tiny model: its tokenizer's files (name -> text), to ship to the workers. `model.tokenizer` if set,
    else one trained on the training captions and saved once under `<output_dir>/tokenizer`, which later runs
    reuse, so a resumed run keeps its vocabulary."""
    if cfg.model.kind != "tiny":
        return None
    folder = Path(cfg.model.tokenizer) if cfg.model.tokenizer else output_dir / "tokenizer"
    if not cfg.model.tokenizer and not (folder / "tokenizer.json").exists():
        tmp = output_dir / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        train_tokenizer(captions, cfg.model.vocab_size, out_dir=tmp)
        tmp.rename(folder)
    return {p.name: p.read_text(encoding="utf-8") for p in folder.iterdir() if p.is_file()}


def run_training(cfg: Config, hooks: Sequence[Hook] = (), log: Callable[[str], None] = print,
                 on_stall: Callable[[str], None] | None = None) -> TrainResult:
    """Fine-tune as `cfg` says on the connected Ray cluster (`ray.init` first); export the best checkpoint to
    `<train.output_dir>/best` and return where everything is. Re-running with the same output_dir resumes.

    `train.num_workers` is fitted to the cluster first (stgpt.resources: `auto` sized, too many refused with
    ResourceError); no step finishing for `cluster.stall_fail_s` calls `on_stall(report)` (jobs exit)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = fit_training(cfg, log)
    t = cfg.train
    start = time.perf_counter()
    output_dir = Path(t.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, output_dir=str(output_dir)))
    t = cfg.train

    train_paths = split_paths(cfg, "train")
    val_paths = split_paths(cfg, "validation", required=False)
    captions = read_captions(train_paths)
    tokenizer_files = prepare_tokenizer(cfg, (c for texts in captions.values() for c in texts), output_dir)
    expand = t.all_captions_each_epoch
    num_samples = sum(max(1, len(texts)) if expand else 1 for texts in captions.values())
    if num_samples // t.num_workers < 1:
        raise ValueError(f"{num_samples} training samples cannot be split over {t.num_workers} workers")
    if t.checkpoint_metric == "val_cider" and not t.val_cider_videos:
        raise ValueError("train.checkpoint_metric=val_cider needs train.val_cider_videos > 0")
    if not val_paths and t.checkpoint_metric.startswith("val_"):
        log(f"no validation shards in {cfg.data.shards}: checkpoints are ranked by train_loss")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, checkpoint_metric="train_loss"))
        t = cfg.train
    datasets = {"train": shard_dataset(train_paths, expand_captions=expand)}
    if val_paths:
        datasets["validation"] = shard_dataset(val_paths)

    # A worker's ray.train.report waits until the controller has taken its previous report, and the controller
    # polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), so metrics reported more often than
    # that stall training. Poll every 0.5 s unless the user chose otherwise (Ray propagates it to the controller).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    mode = metric_mode(t.checkpoint_metric)
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg, "tokenizer_files": tokenizer_files, "num_train_samples": num_samples,
                           "has_validation": bool(val_paths),
                           "hooks": [*hooks, Heartbeat(str(output_dir / HEARTBEAT_FILE))]},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=str(output_dir),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                                         checkpoint_score_attribute=t.checkpoint_metric,
                                                         checkpoint_score_order=mode),
        ),
        datasets=datasets,
    )
    log(f"training on {len(captions)} videos ({num_samples} samples/epoch, {len(train_paths)} train shards, "
        f"{len(val_paths)} validation shards) with {t.num_workers} worker(s); output: {output_dir}")
    # fit_training left cluster.data_cpus CPUs beside the workers' placement group: Ray Data's budget.
    with (Watchdog.from_config("training step", cfg.cluster, on_fail=on_stall, log=log,
                               probe=heartbeat_probe(output_dir / HEARTBEAT_FILE)),
          EpochProgress(output_dir / PROGRESS_FILE, t.epochs, log)):
        result = trainer.fit()
    if result.error is not None:
        raise result.error

    best = _best(result, t.checkpoint_metric, mode)
    best_dir = None
    best_metrics: dict[str, Any] = {}
    if best is not None:
        checkpoint, best_metrics = best
        best_dir = export_checkpoint(checkpoint, output_dir / BEST_DIR)
    seconds = time.perf_counter() - start
    summary = TrainResult(best_dir=best_dir, best_metrics=dict(best_metrics), last_metrics=dict(result.metrics or {}),
                          ray_path=str(result.path), seconds=seconds, return_value=result.return_value,
                          ray_result=result)
    _write_json(output_dir / "summary.json", {
        "best_dir": str(best_dir) if best_dir else None, "best_metrics": summary.best_metrics,
        "last_metrics": summary.last_metrics, "ray_path": summary.ray_path, "seconds": seconds,
        "tensorboard": str(output_dir / "tensorboard"), "checkpoint_metric": t.checkpoint_metric,
    })
    return summary


class EpochProgress:
    """Shows each finished epoch on the driver while `trainer.fit()` runs: rank 0 appends its metrics to
    `<train.output_dir>/epochs.jsonl` and a thread here reads the new lines. Worker logs may not reach the driver
    (`log_to_driver=False`, a job's own log), and the output directory is the run's shared storage anyway."""

    def __init__(self, path: Path, epochs: int, log: Callable[[str], None], interval_s: float = 1.0):
        self.path, self.epochs, self.log, self.interval_s = path, epochs, log, interval_s
        self.offset = path.stat().st_size if path.exists() else 0  # lines of earlier runs are not news
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="epoch-progress", daemon=True)

    def __enter__(self) -> "EpochProgress":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._show_new()  # the last epoch's line

    def _follow(self) -> None:
        while not self.stop.wait(self.interval_s):
            self._show_new()

    def _show_new(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as lines:
            lines.seek(self.offset)
            for line in lines:
                if not line.endswith("\n"):
                    break  # rank 0 is still writing it
                self.offset += len(line.encode("utf-8"))
                try:
                    self.log(format_epoch(json.loads(line), self.epochs))
                except (ValueError, KeyError):
                    continue


def format_epoch(metrics: dict, epochs: int) -> str:
    """One line for people: 'epoch 3/60: train_loss 1.234, val_loss 1.111, 118 samples/s, 9 s'."""
    parts = [f"{key} {metrics[key]:.4g}" for key in ("train_loss", "val_loss", "val_cider") if key in metrics]
    parts += [f"{metrics['samples_per_s']:.0f} samples/s", f"{metrics['epoch_seconds']:.0f} s"]
    if metrics.get("bad_rows"):
        parts.append(f"{metrics['bad_rows']} bad rows skipped")
    return f"epoch {metrics['epoch'] + 1}/{epochs}: " + ", ".join(parts)


def _best(result, metric: str, mode: str):
    """(checkpoint, metrics) of the best epoch-end checkpoint Ray kept (mid-epoch ones carry no real score)."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if not m.get("mid_epoch") and metric in m
              and math.isfinite(float(m[metric]))]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda item: float(item[1][metric]))


def export_checkpoint(checkpoint, destination: Path) -> Path:
    """Copy a Ray checkpoint to a plain Hugging Face checkpoint directory (no training state), atomically."""
    destination = Path(destination)
    tmp = destination.with_name(f".{destination.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.to_directory(str(tmp))
    (tmp / STATE_FILE).unlink(missing_ok=True)
    old = destination.with_name(f".{destination.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if destination.exists():
        destination.rename(old)
    tmp.rename(destination)
    shutil.rmtree(old, ignore_errors=True)
    return destination


def local_ray_cpus(cfg: Config) -> int:
    """CPUs for a local Ray that trains as `cfg` says: the workers' plus one for Ray Data, or the machine's."""
    workers = cfg.train.num_workers if isinstance(cfg.train.num_workers, int) else 1  # auto: fits what there is
    return max(os.cpu_count() or 1, math.ceil(workers * cfg.train.cpus_per_worker + cfg.cluster.data_cpus))


def init_local_ray(num_cpus: int, **kwargs) -> None:
    """Start a private local Ray whose dashboard is on a free port, and point Ray's state API at it.

    Ray Train's PlacementGroupCleaner asks the state API whether the run's controller is alive. Given no address,
    the state API picks the newest Ray instance on the machine; where several run (tests, other users) that may
    be another one, and the cleaner then removes this run's placement group, killing its workers. Naming this
    instance's dashboard in the job's environment (inherited by every actor) avoids that.
    """
    import socket

    import ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_port=port,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}, **kwargs)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str) + "\n")
    tmp.rename(path)


# ----------------------------------------------------------------------------------------------------------
# The synthetic default: make the data if missing, and measure what the model learned


def prepare_synthetic_shards(cfg: Config, log: Callable[[str], None] = print) -> None:
    """Make the synthetic dataset (`data.root`) and preprocess it into `data.shards`, as far as not done yet.

    Both steps are idempotent and check their output against the config: a folder made with other sizes or
    frame settings is an error that says so (FileExistsError, PreprocessError), never silently trained on.
    """
    from stgpt.preprocessing import SplitInput, preprocess
    from stgpt.synthetic import make_synthetic_dataset

    data = cfg.data
    dataset = make_synthetic_dataset(data.root, {"train": data.synthetic_train, "validation": data.synthetic_validation,
                                                 "test": data.synthetic_test}, seed=data.synthetic_seed)
    sources = [SplitInput(split, str(path), str(dataset.video_dir)) for split, path in dataset.annotation_paths.items()]
    summary = preprocess(sources, data.shards, cfg, progress=False, log=log)
    log(summary.format())


def synthetic_accuracy(cfg: Config, checkpoint_dir: str | Path, split: str = "test",
                       batch_size: int = 16) -> dict[str, Any]:
    """Caption the synthetic `split` from its shards with a checkpoint (beam search as configured) and score the
    colour, shape and motion named in each caption against the recorded attributes (chance: 1/4, 1/3, 1/6)."""
    import pyarrow.parquet as pq

    from stgpt.inference import Captioner
    from stgpt.synthetic import SyntheticDataset, attribute_accuracy

    captioner = Captioner.from_pretrained(checkpoint_dir, use_gpu=cfg.train.use_gpu)
    predictions: dict[str, str] = {}
    for path in split_paths(cfg, split):
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=SHARD_COLUMNS):
            batch = collate_rows(table_columns(pa.Table.from_batches([record_batch])), captioner.bundle.tokenizer,
                                 captioner.video, seed=0, epoch=VALIDATION_EPOCH)
            if batch.num_ok:
                predictions.update(zip(batch.video_ids, captioner.caption_frames(batch.frames)))
    attributes = SyntheticDataset.from_root(cfg.data.root).attributes(split)
    accuracy = attribute_accuracy(predictions, attributes)
    examples = [{"video_id": v, "prediction": predictions[v], "truth": attributes[v]["objects"]}
                for v in sorted(predictions)[:5]]
    return {**accuracy, "chance": {"colour": 1 / 4, "shape": 1 / 3, "motion": 1 / 6}, "examples": examples}
