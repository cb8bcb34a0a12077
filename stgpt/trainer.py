"""The training driver: fit the job to the cluster, hand `train_func` to Ray Train's `TorchTrainer`, export the best
checkpoint, and for the synthetic default make the data first and measure what the model learned.

Resuming: Ray Train keeps its run under `<train.output_dir>/ray` (a fixed name), so a restarted worker group
(`FailureConfig(max_failures)`) or a re-run with the same output_dir resumes from the latest checkpoint. The best
one is copied, without the training state, to `<train.output_dir>/best`: a plain Hugging Face checkpoint.
Outputs under `train.output_dir`: `best/`, `tokenizer/` (tiny model), `tensorboard/`, `ray/`, `summary.json`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import ray.train
from ray.data import ExecutionOptions, ExecutionResources
from ray.train.torch import TorchTrainer

from stgpt import storage, synthetic
from stgpt.checkpoints import BEST_DIR
from stgpt.config import Config
from stgpt.evaluation import EvaluationResult, evaluate, synthetic_input
from stgpt.model import train_tokenizer
from stgpt.preprocessing import SplitInput, preprocess
from stgpt.pretraining import run_pretraining, stage_seconds
from stgpt.resources import Heartbeat, Watchdog, exit_stalled, fit_training, heartbeat_probe
from stgpt.shard_data import read_captions, shard_dataset, split_paths
from stgpt.train_log import PROGRESS_FILE, EpochProgress
from stgpt.training import STATE_FILE, Hook, metric_mode, train_func

HEARTBEAT_FILE = ".heartbeat"  # touched by rank 0 as steps finish, for the driver's stall watchdog
RUN_NAME = "ray"  # Ray Train's run folder under train.output_dir; a fixed name is what makes re-runs resume
SUMMARY_FILE = "summary.json"
TEST_EVAL_DIR = "test_eval"  # the synthetic default's evaluation of its best checkpoint, under train.output_dir


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
    stage_seconds: dict[str, float] = field(default_factory=dict)  # pretraining stages and captioning (issue 13)


def prepare_tokenizer(cfg: Config, captions: Iterable[str], output_dir: Path) -> dict[str, str] | None:
    """For the tiny model: its tokenizer's files (name -> text), to ship to the workers. `model.tokenizer` if set,
    else one trained on the training captions and saved once under `<output_dir>/tokenizer`, which later runs
    reuse, so a resumed run keeps its vocabulary."""
    if cfg.model.kind != "tiny":
        return None
    folder = Path(cfg.model.tokenizer) if cfg.model.tokenizer else output_dir / "tokenizer"
    if not cfg.model.tokenizer and not (folder / "tokenizer.json").exists():
        with storage.replacing(folder) as temporary:
            train_tokenizer(captions, cfg.model.vocab_size, out_dir=temporary)
    return {p.name: p.read_text(encoding="utf-8") for p in folder.iterdir() if p.is_file()}


def run_training(cfg: Config, hooks: Sequence[Hook] = (), log: Callable[[str], None] = print,
                 on_stall: Callable[[str], None] | None = None) -> TrainResult:
    """Fine-tune as `cfg` says on the connected Ray cluster; export the best checkpoint to
    `<train.output_dir>/best` and return where everything is. Re-running with the same output_dir resumes.

    `train.num_workers` is fitted to the cluster first (stgpt.resources: `auto` sized, too many refused with
    ResourceError); no step finishing for `cluster.stall_fail_s` calls `on_stall(report)` (jobs exit)."""
    start = time.perf_counter()
    cfg = fit_training(cfg, log)
    output_dir = Path(cfg.train.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(output_dir)))
    cfg, loop_config, datasets = _prepare(cfg, output_dir, log)
    t = cfg.train
    loop_config["hooks"] = [*hooks, Heartbeat(str(output_dir / HEARTBEAT_FILE))]
    # A worker's ray.train.report waits until the controller has taken its previous report, and the controller
    # polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), so metrics reported more often than
    # that stall training. Poll every 0.5 s unless the user chose otherwise (Ray propagates it to the controller).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    mode = metric_mode(t.checkpoint_metric)
    # Ray Data's budget is cluster.data_cpus: fit_training checked that many CPUs are there beside the workers'
    # placement group, and the limit keeps the pipeline within it.
    data_limits = ExecutionOptions(resource_limits=ExecutionResources(cpu=cfg.cluster.data_cpus))
    trainer = TorchTrainer(
        train_func, train_loop_config=loop_config, datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=data_limits),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={
            "CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=str(output_dir),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                                         checkpoint_score_attribute=t.checkpoint_metric,
                                                         checkpoint_score_order=mode),
        ),
    )
    with (Watchdog.from_config("training step", cfg.cluster, on_fail=on_stall, log=log,
                               probe=heartbeat_probe(output_dir / HEARTBEAT_FILE)),
          EpochProgress(output_dir / PROGRESS_FILE, t.epochs, log)):
        result = trainer.fit()
    if result.error is not None:
        raise result.error

    best = _best(result, t.checkpoint_metric, mode)
    best_dir, best_metrics = None, {}
    if best is not None:
        checkpoint, best_metrics = best
        best_dir = export_checkpoint(checkpoint, output_dir / BEST_DIR)
    summary = TrainResult(best_dir=best_dir, best_metrics=dict(best_metrics), last_metrics=dict(result.metrics or {}),
                          ray_path=str(result.path), seconds=time.perf_counter() - start,
                          return_value=result.return_value, ray_result=result)
    storage.write_json(output_dir / SUMMARY_FILE, {
        "best_dir": str(best_dir) if best_dir else None, "best_metrics": summary.best_metrics,
        "last_metrics": summary.last_metrics, "ray_path": summary.ray_path, "seconds": summary.seconds,
        "tensorboard": str(output_dir / "tensorboard"), "checkpoint_metric": t.checkpoint_metric,
    })
    return summary


def _prepare(cfg: Config, output_dir: Path, log: Callable[[str], None]) -> tuple[Config, dict, dict]:
    """The shards' datasets, the tokenizer for the tiny model and the samples per epoch; settings that cannot
    work are refused here (ValueError), before any worker starts."""
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
    datasets = {"train": shard_dataset(train_paths, expand_captions=expand)}
    if val_paths:
        datasets["validation"] = shard_dataset(val_paths)
    log(f"training on {len(captions)} videos ({num_samples} samples/epoch, {len(train_paths)} train shards, "
        f"{len(val_paths)} validation shards) with {t.num_workers} worker(s); output: {output_dir}")
    loop_config = {"cfg": cfg, "tokenizer_files": tokenizer_files, "num_train_samples": num_samples,
                   "has_validation": bool(val_paths)}
    return cfg, loop_config, datasets


def _best(result, metric: str, mode: str):
    """(checkpoint, metrics) of the best epoch-end checkpoint Ray kept (mid-epoch ones carry no real score)."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if not m.get("mid_epoch") and metric in m
              and math.isfinite(float(m[metric]))]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda item: float(item[1][metric]))


def export_checkpoint(checkpoint: ray.train.Checkpoint, destination: Path) -> Path:
    """Copy a Ray checkpoint to a plain Hugging Face checkpoint directory (no training state), atomically."""
    with storage.replacing(destination) as temporary:
        checkpoint.to_directory(str(temporary))
        (temporary / STATE_FILE).unlink(missing_ok=True)
    return Path(destination)


def prepare_synthetic_shards(cfg: Config, log: Callable[[str], None] = print) -> None:
    """Make the synthetic dataset (`data.root`) and preprocess it into `data.shards`, as far as not done yet.

    Both steps are idempotent and check their output against the config: a folder made with other sizes or
    frame settings is an error that says so (FileExistsError, PreprocessError), never silently trained on.
    """
    dataset = synthetic.from_config(cfg.data)
    sources = [SplitInput(split, str(path), str(dataset.video_dir)) for split, path in dataset.annotation_paths.items()]
    log(preprocess(sources, cfg.data.shards, cfg, progress=False, log=log).format())


def train(cfg: Config, log: Callable[[str], None] = print, on_stall: Callable[[str], None] = exit_stalled,
          ) -> tuple[TrainResult, EvaluationResult | None]:
    """What `jobs/train.py` runs: for the synthetic default (no `data.annotations`) make the data first, train,
    then caption the synthetic test split with the best checkpoint (evaluation's offline captioning path) and
    add its colour / shape / motion accuracy to summary.json."""
    is_synthetic = cfg.data.annotations is None
    if is_synthetic:
        with Watchdog.from_config("video preprocessing", cfg.cluster, on_fail=on_stall, log=log):
            prepare_synthetic_shards(cfg, log)
    cfg, stages = run_pretraining(cfg, log)  # the tiny default's encoder and decoder, where not made yet
    result = run_training(cfg, log=log, on_stall=on_stall)
    result.stage_seconds = stage_seconds(stages, result.seconds)
    output = Path(cfg.train.output_dir).resolve()
    summary = json.loads((output / SUMMARY_FILE).read_text())
    summary.update(stage_seconds=result.stage_seconds)
    storage.write_json(output / SUMMARY_FILE, summary)
    if not is_synthetic or result.best_dir is None:
        return result, None
    with Watchdog.from_config("caption", cfg.cluster, on_fail=on_stall, log=log):
        tested = evaluate(synthetic_input(cfg, log), str(result.best_dir), cfg, output / TEST_EVAL_DIR, log=log)
    summary.update(test_accuracy=tested.attribute_accuracy, test_eval=str(output / TEST_EVAL_DIR),
                   time_reversal=tested.info.get("time_reversal"), per_motion=tested.info.get("per_motion"))
    storage.write_json(output / SUMMARY_FILE, summary)
    return result, tested
