"""What training says while it runs: metrics summed over the workers, TensorBoard events, the driver's epoch lines.

Every worker computes its own sums; `Logger` all-reduces them (Ray Train's report is a barrier, so every worker
reports), rank 0 writes TensorBoard events and appends each epoch's metrics to `<train.output_dir>/epochs.jsonl`,
and `EpochProgress` on the driver prints the new lines (worker logs may not reach the driver).
"""
from __future__ import annotations

import json
import math
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import ray.train
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

PROGRESS_FILE = "epochs.jsonl"  # one line of metrics per finished epoch, appended by rank 0 (EpochProgress)


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
        on_device = values.to(self.device) if dist.get_backend() == "nccl" else values
        dist.all_reduce(on_device, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return on_device.cpu()

    def gather(self, value: Any) -> list:
        if self.world == 1:
            return [value]
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

    def report_train(self, progress: Any, lr: float) -> None:
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


def tensorboard(output_dir: str, step: int) -> SummaryWriter:
    """The run's event writer (rank 0), under `<output_dir>/tensorboard`."""
    # purge_step drops the events a crashed attempt logged after the checkpoint we resume from (at `step`)
    return SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=step + 1 if step else None)


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
    parts = [f"{key} {metrics[key]:.4g}" for key in ("train_loss", "val_loss", "val_cider", "val_colour", "val_shape",
                                                      "val_motion") if key in metrics]  # the last 3: encoder stage
    parts += [f"{metrics['samples_per_s']:.0f} samples/s", f"{metrics['epoch_seconds']:.0f} s"]
    if metrics.get("bad_rows"):
        parts.append(f"{metrics['bad_rows']} bad rows skipped")
    return f"epoch {metrics['epoch'] + 1}/{epochs}: " + ", ".join(parts)


