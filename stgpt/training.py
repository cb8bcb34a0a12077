"""The training loop that runs on every Ray Train worker (`train_func`), and what a checkpoint holds.

Read top to bottom: `train_func` sets up (model, optimiser and schedule, fresh or resumed from the latest
checkpoint), runs the epochs (`_train_epoch`: steps with gradient accumulation; `_end_epoch`: validation,
metrics, checkpoint), and returns where it started and ended. The data comes from `stgpt.shard_data`, the
metrics go through `stgpt.train_log`, and the driver that starts it all is `stgpt.trainer`.

Checkpoints: rank 0 writes the Hugging Face layout of `stgpt.model.save_checkpoint` plus `training_state.pt`
(optimiser, scheduler, grad scaler, progress, RNG states) and registers it with `ray.train.report`. Resuming
restores all of it, including the data position (batches done in the epoch; each worker skips that many).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import ray.train
import ray.train.torch
import torch
from transformers import get_linear_schedule_with_warmup, set_seed

from stgpt.config import Config, VideoConfig
from stgpt.device import autocast, resolve_precision
from stgpt.encoder import apply_encoder_options
from stgpt.metrics import CIDER_D, score_captions
from stgpt.model import CaptionModel, build_model, generation_config, load_checkpoint, save_checkpoint, unwrap
from stgpt.shard_data import VALIDATION_EPOCH, Batch, collate_rows
from stgpt.train_log import PROGRESS_FILE, Logger, RunningMean, TimedIterator, tensorboard
from stgpt.transforms import to_pixel_values

STATE_FILE = "training_state.pt"  # optimiser, scheduler, scaler, progress: in Ray's checkpoints, not in best/

Hook = Callable[[dict], None]  # called after each optimiser step with the progress (fault injection in tests)


# ----------------------------------------------------------------------------------------------------------
# The loop


def train_func(config: dict) -> dict:
    """Ray Train's per-worker function. `config`: `cfg` (Config), `tokenizer_files` (name -> text, for the tiny
    model's tokenizer), `num_train_samples`, `has_validation`, `hooks`. Returns where this attempt started and
    ended."""
    run = _setup(config)
    for epoch in range(run.progress.epoch, run.cfg.train.epochs):
        if run.reached_max_steps():
            break
        train_metrics, stopped_mid_epoch = _train_epoch(run, epoch)
        _end_epoch(run, epoch, train_metrics, stopped_mid_epoch)
    if run.writer is not None:
        run.writer.close()
    return {"started": run.started, "finished": dataclasses.asdict(run.progress), "world_size": run.world}


@dataclass
class Progress:
    """Where training is: the epoch being run, the batches of it already done, optimiser steps so far."""

    epoch: int = 0
    batch: int = 0  # batches (per worker) of `epoch` already trained: the data position inside the epoch
    step: int = 0


@dataclass
class WorkerRun:
    """Everything one worker's loop works with."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    precision: str
    caption_model: CaptionModel  # the model with its tokenizer and video settings (what a checkpoint saves)
    model: torch.nn.Module  # the same model, wrapped for DDP when world > 1
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    progress: Progress
    log: Logger
    writer: Any
    train_data: Any  # this worker's streaming split of the training dataset (Ray Data)
    val_data: Any
    hooks: Sequence[Hook] = ()
    started: dict = field(default_factory=dict)

    @property
    def raw_model(self) -> torch.nn.Module:
        return unwrap(self.model)

    def reached_max_steps(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return bool(max_steps) and self.progress.step >= max_steps


def _setup(config: dict) -> WorkerRun:
    """Model, optimiser, schedule and progress: fresh, or restored from the latest checkpoint (a restarted worker
    group or a re-run with the same output_dir); the checkpoint holds the tokenizer and the architecture too."""
    cfg: Config = config["cfg"]
    t = cfg.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    precision = resolve_precision(t.precision, device)
    set_seed(t.seed)
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as resume_dir:
        resume_dir = Path(resume_dir) if resume_dir else None
        caption_model = _worker_model(cfg, config.get("tokenizer_files"), resume_dir)
        apply_encoder_options(caption_model.model, cfg.encoder)
        # While the encoder is still (`train.encoder_freeze_ratio`) its parameters get no gradient (`forward`):
        # DDP is told that some parameters may go unused in a step.
        model = ray.train.torch.prepare_model(caption_model.model, parallel_strategy="ddp" if world > 1 else None,
                                              parallel_strategy_kwargs={"find_unused_parameters": True}
                                              if world > 1 and t.encoder_freeze_ratio > 0 else None)
        raw_model = unwrap(model)
        optimizer = make_optimizer(raw_model, t.lr, t.weight_decay, t.encoder_lr_scale)
        per_epoch = steps_per_epoch(config["num_train_samples"], world, t.batch_size, t.grad_accum_steps)
        total_steps = min(per_epoch * t.epochs, t.max_steps) if t.max_steps else per_epoch * t.epochs
        scheduler = make_scheduler(optimizer, total_steps, t.warmup_ratio, t.encoder_freeze_ratio)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        progress = load_training_state(resume_dir, optimizer, scheduler, scaler) if resume_dir else Progress()
    started = {"resumed": resume_dir is not None, **dataclasses.asdict(progress),
               "scheduler_step": int(scheduler.last_epoch), "lr": scheduler.get_last_lr()[0],
               "optimizer_state_entries": len(optimizer.state)}
    writer = tensorboard(t.output_dir, progress.step) if rank == 0 else None
    log = Logger(rank, world, writer, device, Path(t.output_dir) / PROGRESS_FILE if rank == 0 else None)
    val_data = ray.train.get_dataset_shard("validation") if config.get("has_validation") else None
    return WorkerRun(cfg, rank, world, device, precision, caption_model, model, optimizer, scheduler, scaler, progress,
                     log, writer, ray.train.get_dataset_shard("train"), val_data, config.get("hooks") or (), started)


def _train_epoch(run: WorkerRun, epoch: int) -> tuple[dict[str, float], bool]:
    """One pass over this worker's split (the batches a resumed epoch already did are skipped): the epoch's loss
    and throughput over all workers, and whether `train.max_steps` stopped it before its end (a resume with a
    larger limit continues this epoch)."""
    t = run.cfg.train
    skip = run.progress.batch if epoch == run.progress.epoch else 0
    run.progress = Progress(epoch, skip, run.progress.step)
    run.model.train()
    start, samples, loss_mean = time.perf_counter(), 0, RunningMean()
    micro = 0  # batches in the current accumulation group
    stopped_mid_epoch = False
    batches = TimedIterator(run.train_data.iter_torch_batches(
        batch_size=t.batch_size, prefetch_batches=2,
        collate_fn=functools.partial(collate_rows, tokenizer=run.caption_model.tokenizer, video=run.cfg.video,
                                     seed=t.seed, epoch=epoch),
        local_shuffle_buffer_size=t.shuffle_buffer or None,
        local_shuffle_seed=t.seed * 100_003 + epoch * 1_009 + run.rank,
    ))
    for index, (batch, is_last) in enumerate(lookahead(batches)):
        if index < skip:  # resuming mid-epoch: these batches were trained before the checkpoint
            continue
        run.log.bad_rows(batch.bad)
        micro += 1
        ends_group = micro == t.grad_accum_steps or is_last
        with run.model.no_sync() if run.world > 1 and not ends_group else contextlib.nullcontext():
            with autocast(run.device, run.precision):
                still = t.encoder_freeze_ratio > 0 and encoder_is_still(run.optimizer)  # DDP allows it only then
                loss = forward(run.model, batch, run.cfg.video, run.device, still)
            weight = 1.0 if batch.num_ok else 0.0  # an all-bad batch still runs backward, contributing 0
            run.scaler.scale(loss * weight / t.grad_accum_steps).backward()
        if batch.num_ok:
            run.log.add_train(loss.item(), batch.num_ok)
            loss_mean.add(loss.item())
        samples += batch.num_ok
        run.progress.batch = index + 1
        if not ends_group:
            continue
        micro = 0
        _optimizer_step(run)
        if t.checkpoint_every_steps and run.progress.step % t.checkpoint_every_steps == 0 and not is_last:
            _report_checkpoint(run, {"epoch": epoch, "step": run.progress.step,
                                     t.checkpoint_metric: _worst(t.checkpoint_metric), "mid_epoch": True})
        for hook in run.hooks:
            hook({"rank": run.rank, "world_size": run.world, **dataclasses.asdict(run.progress)})
        if run.reached_max_steps():  # every worker stops at the same step
            stopped_mid_epoch = not is_last
            break
    return run.log.epoch_train(loss_mean, samples, time.perf_counter() - start, batches.seconds), stopped_mid_epoch


def _optimizer_step(run: WorkerRun) -> None:
    """Unscale, clip, step, schedule; log every `train.log_every` steps."""
    t = run.cfg.train
    run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), t.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.progress.step += 1
    if run.progress.step % t.log_every == 0:
        run.log.report_train(run.progress, run.scheduler.get_last_lr()[0])


def _end_epoch(run: WorkerRun, epoch: int, train_metrics: dict[str, float], stopped_mid_epoch: bool) -> None:
    """Validation, the epoch's metrics (TensorBoard, epochs.jsonl), and a checkpoint ranked by them."""
    t = run.cfg.train
    metrics = {"epoch": epoch, "step": run.progress.step, "lr": run.scheduler.get_last_lr()[0], **train_metrics}
    if run.val_data is not None:
        metrics.update(validate(run.model, run.caption_model, run.val_data, run.device, run.precision, run.cfg, run.log))
    metrics.update(run.log.epoch_health())
    if run.rank == 0 and t.checkpoint_metric not in metrics:  # rank 0's metrics are the checkpoint's
        raise KeyError(f"train.checkpoint_metric={t.checkpoint_metric!r} is not among the epoch metrics "
                       f"{sorted(metrics)}")
    run.log.write_epoch(metrics, run.progress.step)
    step = run.progress.step
    run.progress = Progress(epoch, run.progress.batch, step) if stopped_mid_epoch else Progress(epoch + 1, 0, step)
    _report_checkpoint(run, metrics)


def forward(model, batch: Batch, video: VideoConfig, device: torch.device, still_encoder: bool = False
            ) -> torch.Tensor:
    """The captioning loss of a batch: frames go to the device as uint8 and are normalised there. With
    `still_encoder` (its learning rate is 0 this step) the encoder runs without autograd, so the backward pass
    stops at the cross-attention instead of computing encoder gradients that would change nothing."""
    pixel_values = to_pixel_values(batch.frames.to(device, non_blocking=True), video)
    targets = {"labels": batch.labels.to(device, non_blocking=True),
               "decoder_attention_mask": batch.decoder_attention_mask.to(device, non_blocking=True)}
    if not still_encoder:
        return model(pixel_values=pixel_values, **targets).loss
    raw = unwrap(model)
    with torch.no_grad():
        encoder_outputs = raw.encoder(pixel_values=pixel_values)
    return model(encoder_outputs=encoder_outputs, **targets).loss


def encoder_is_still(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every encoder group (`make_optimizer`'s) has learning rate 0 this step (`make_scheduler`'s still
    phase): its gradients would change nothing, so `forward` leaves the encoder out of the backward pass."""
    groups = [group for group in optimizer.param_groups if group.get("encoder")]
    return bool(groups) and all(group["lr"] == 0 for group in groups)


@torch.no_grad()
def validate(model, caption_model, val_data, device: torch.device, precision: str, cfg: Config,
             log: Logger) -> dict[str, float]:
    """Token-weighted validation loss over every worker's share, and CIDEr-D of generated captions on up to
    `train.val_cider_videos` videos when asked (gathered and scored on rank 0)."""
    model.eval()
    t = cfg.train
    raw = unwrap(model)
    totals = torch.zeros(2, dtype=torch.float64)  # loss * tokens, tokens
    predictions: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    cider_quota = math.ceil(t.val_cider_videos / log.world) if t.val_cider_videos else 0
    collate = functools.partial(collate_rows, tokenizer=caption_model.tokenizer, video=cfg.video, seed=t.seed,
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
            texts = caption_model.tokenizer.batch_decode(output, skip_special_tokens=True)
            for video_id, text, refs in zip(batch.video_ids, texts, batch.references):
                predictions[video_id] = text.strip()
                references[video_id] = refs
    totals = log.all_reduce(totals)
    out = {"val_loss": float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")}
    if t.val_cider_videos:
        out.update(_cider(log, predictions, references))
    model.train()
    return out


def _cider(log: Logger, predictions: dict, references: dict) -> dict[str, float]:
    gathered = log.gather((predictions, references))
    if log.rank != 0:
        return {}
    all_predictions = {k: v for p, _ in gathered for k, v in p.items()}
    all_references = {k: v for _, r in gathered for k, v in r.items()}
    if not all_predictions:
        return {}
    report = score_captions(all_predictions, all_references, metrics=[CIDER_D])
    return {"val_cider": float(report.corpus[CIDER_D]), "val_cider_videos": len(all_predictions)}


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


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   encoder_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm weights (1-D parameters), as Hugging Face's Trainer does. The
    encoder's parameters (`encoder.*`, groups marked "encoder") learn at `encoder_lr_scale` x `lr`: a pretrained
    encoder fine-tuned at the decoder's rate forgot the motion it knew (issue 13, benchmarks/RESULTS.md)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith("encoder."), p.ndim >= 2), []).append(p)
    return torch.optim.AdamW([{"params": params, "weight_decay": weight_decay if decays else 0.0,
                               "lr": lr * encoder_lr_scale if encoder else lr, "encoder": encoder}
                              for (encoder, decays), params in sorted(groups.items())], lr=lr)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                   encoder_freeze_ratio: float = 0.0):
    """Linear warm-up to the peak learning rate over `warmup_ratio` of the steps, then linear decay to zero.
    With `encoder_freeze_ratio`, the encoder's groups (`make_optimizer`'s) stay at 0 for that fraction of the
    steps: the decoder's fresh cross-attention learns to read a pretrained encoder before its gradients reach it."""
    total = max(1, total_steps)
    schedule = get_linear_schedule_with_warmup(optimizer, int(round(warmup_ratio * total)), total)
    frozen = int(round(encoder_freeze_ratio * total))
    if not frozen:
        return schedule
    linear = schedule.lr_lambdas[0]

    def encoder_factor(step: int) -> float:
        return 0.0 if step < frozen else linear(step)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [encoder_factor if group.get("encoder") else linear for group in optimizer.param_groups])


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int, grad_accum_steps: int) -> int:
    """Optimiser steps in one epoch: Ray splits the samples equally over the workers (dropping the remainder)."""
    batches = math.ceil((num_samples // world_size) / batch_size)
    return math.ceil(batches / grad_accum_steps)


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


def _report_checkpoint(run: WorkerRun, metrics: dict) -> None:
    """Rank 0 writes the checkpoint and every worker reports (Ray's report is a barrier)."""
    name = f"checkpoint-{run.progress.step:07d}"  # trainer_state.json inside says which epoch and batch
    if run.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="stgpt-ckpt-") as tmp:
        save_checkpoint(dataclasses.replace(run.caption_model, model=run.raw_model), tmp)
        save_training_state(tmp, run.optimizer, run.scheduler, run.scaler, run.progress)
        (Path(tmp) / "trainer_state.json").write_text(json.dumps({"progress": dataclasses.asdict(run.progress),
                                                                  "metrics": metrics}, indent=1, default=float))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def _worker_model(cfg: Config, tokenizer_files: dict[str, str] | None, resume_dir: Path | None):
    """The model to train on this worker: from the checkpoint being resumed, else as the config says (with the
    tokenizer the driver trained, shipped as file contents so workers need no shared disk)."""
    if resume_dir is not None:
        caption_model = load_checkpoint(resume_dir, num_frames=cfg.video.num_frames)
        caption_model = dataclasses.replace(caption_model, video=cfg.video)
        caption_model.model.generation_config = generation_config(cfg.generation, caption_model.tokenizer)
        return caption_model
    if tokenizer_files:
        folder = Path(tempfile.mkdtemp(prefix="stgpt-tokenizer-"))
        for name, text in tokenizer_files.items():
            (folder / name).write_text(text, encoding="utf-8")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tokenizer=str(folder)))
    set_seed(cfg.train.seed)  # same initial weights on every worker (DDP also broadcasts rank 0's)
    return build_model(cfg)


def _worst(metric: str) -> float:
    # finite: Ray stores checkpoint metrics as JSON
    return 1e30 if metric_mode(metric) == "min" else -1e30


def metric_mode(metric: str) -> str:
    """Losses are minimised, everything else (CIDEr-D, accuracies) maximised."""
    return "min" if metric.endswith("loss") else "max"
