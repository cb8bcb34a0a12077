"""Training throughput: the Ray Train loop (1 and 2 workers) against a plain single-process PyTorch loop.

    python benchmarks/train_bench.py                 # throughput + memory; writes section "train" of RESULTS.md
    python benchmarks/train_bench.py --learn         # also runs `python jobs/train.py` (the default, no arguments)
                                                     # and writes its accuracy and wall time: section "train-default"
    python benchmarks/train_bench.py --no-write      # print only

Same model (configs/tiny.yaml), same shards (the synthetic dataset preprocessed by stgpt.preprocessing), same
per-worker batch size and threads per worker (`train.cpus_per_worker`) for every loop:

1. plain: one process reads the shards with pyarrow and runs `collate_rows` + forward/backward/AdamW itself;
2. Ray Train, 1 worker: `run_training` (Ray Data streaming split, DDP set-up, reports, checkpoints each epoch);
3. Ray Train, 2 workers: the same with two workers (global batch twice the size).

Throughput is samples per second over windows of `train.log_every` steps; the median window is the steady-state
figure (the first window of each epoch also holds Ray Data's per-epoch start). Whole-run figures (all samples
over all epoch time, per-epoch starts included) are reported beside them. Memory: the peak RSS of the most loaded
Ray Train worker on the dataset and on one 4x larger, the data streaming through both.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._results import machine_info  # noqa: E402
from stgpt.config import CONFIG_DIR, Config, load_config  # noqa: E402

WORK = ROOT / "outputs" / "bench-train"


def make_shards(cfg: Config, num_train: int) -> Config:
    """The synthetic dataset with `num_train` training videos, preprocessed into a shard folder of its own."""
    from stgpt.trainer import prepare_synthetic_shards

    folder = WORK / f"synthetic-{num_train}"
    data = dataclasses.replace(cfg.data, root=str(folder / "data"), shards=str(folder / "shards"),
                               synthetic_train=num_train, synthetic_validation=16, synthetic_test=4)
    cfg = dataclasses.replace(cfg, data=data)
    prepare_synthetic_shards(cfg, log=lambda _: None)
    return cfg


def plain_loop(cfg: Config, epochs: int) -> dict:
    """A single-process PyTorch loop over the same shards, model, batch size, optimiser and threads."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from stgpt.model import build_model
    from stgpt.shard_data import SHARD_COLUMNS, collate_rows, read_captions, split_paths, table_columns
    from stgpt.trainer import prepare_tokenizer
    from stgpt.training import forward, make_optimizer, make_scheduler, steps_per_epoch

    t = cfg.train
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    paths = split_paths(cfg, "train")
    captions = read_captions(paths)
    folder = WORK / "plain"
    folder.mkdir(parents=True, exist_ok=True)
    prepare_tokenizer(cfg, [c for texts in captions.values() for c in texts], folder)
    torch.manual_seed(t.seed)
    model_cfg = dataclasses.replace(cfg.model, tokenizer=str(folder / "tokenizer"))
    captioner = build_model(dataclasses.replace(cfg, model=model_cfg))
    model = captioner.model.train()
    optimizer = make_optimizer(model, t.lr, t.weight_decay)
    scheduler = make_scheduler(optimizer, steps_per_epoch(len(captions), 1, t.batch_size, 1) * epochs, t.warmup_ratio)
    windows, total_samples, total_seconds = [], 0, 0.0
    for epoch in range(epochs):
        start = window_start = time.perf_counter()
        window_samples = step = 0
        for path in paths:
            for record_batch in pq.ParquetFile(path).iter_batches(batch_size=t.batch_size, columns=SHARD_COLUMNS):
                batch = collate_rows(table_columns(pa.Table.from_batches([record_batch])), captioner.tokenizer,
                                     cfg.video, t.seed, epoch)
                loss = forward(model, batch, cfg.video, torch.device("cpu"))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                window_samples += batch.num_ok
                total_samples += batch.num_ok
                if step % t.log_every == 0:
                    now = time.perf_counter()
                    windows.append(window_samples / (now - window_start))
                    window_start, window_samples = now, 0
        total_seconds += time.perf_counter() - start
    return {"steady": statistics.median(windows), "whole": total_samples / total_seconds, "windows": len(windows)}


def ray_loop(cfg: Config, name: str, num_workers: int, epochs: int) -> dict:
    """`run_training` with `num_workers` workers; throughput read back from its TensorBoard events."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stgpt.trainer import run_training

    out = WORK / "runs" / name
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume
    train = dataclasses.replace(cfg.train, output_dir=str(out), num_workers=num_workers, epochs=epochs,
                                keep_checkpoints=1, max_failures=0)
    start = time.perf_counter()
    result = run_training(dataclasses.replace(cfg, train=train), log=lambda _: None)
    seconds = time.perf_counter() - start
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    windows = [e.value for e in events.Scalars("step/samples_per_s")]
    epoch_rates = [e.value for e in events.Scalars("epoch/samples_per_s")]
    peaks = [e.value for e in events.Scalars("epoch/peak_rss_mb")]
    samples = [e.value for e in events.Scalars("epoch/samples")]
    epoch_seconds = [e.value for e in events.Scalars("epoch/epoch_seconds")]
    waits = [e.value for e in events.Scalars("epoch/data_wait_seconds")]
    return {"steady": statistics.median(windows), "whole": sum(samples) / sum(epoch_seconds),
            "epoch_rates": epoch_rates, "peak_rss_mb": max(peaks), "run_seconds": seconds,
            "epoch_seconds": sum(epoch_seconds) / len(epoch_seconds), "data_wait": sum(waits) / len(waits),
            "windows": len(windows), "val_loss": result.last_metrics.get("val_loss")}


def learn(write: bool) -> str:
    """Run the default training job as a fresh checkout would, and report what it reached and how long it took.

    It runs in an empty working directory (the config's paths are relative: `outputs/...`), so the wall time
    includes making and preprocessing the synthetic dataset, and nothing left by earlier runs is reused.
    """
    import shutil

    cfg = load_config(CONFIG_DIR / "tiny.yaml")
    workdir = WORK / "default-run"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    summary_path = workdir / cfg.train.output_dir / "summary.json"
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py")], cwd=workdir, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"jobs/train.py failed with exit status {done.returncode}")
    summary = json.loads(summary_path.read_text())
    acc = summary["test_accuracy"]
    best = summary["best_metrics"]
    stages = summary.get("stage_seconds") or {"caption": summary["seconds"]}  # pretraining stages, then captioning
    lines = [
        "## Training: the default run learns (`python jobs/train.py`, no arguments)",
        "",
        f"{machine_info()}. Wall time of the whole command: **{wall / 60:.1f} min** (making and preprocessing the "
        f"synthetic dataset if missing, Ray start-up, training, generation on the test split); training itself "
        f"{sum(stages.values()) / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in stages.items())}).",
        "",
        f"Config: configs/tiny.yaml ({cfg.model.hidden_size}-wide, {cfg.model.num_layers} layers, patch "
        f"{cfg.model.patch_size}, {cfg.video.num_frames} frames of {cfg.video.crop_size} px; "
        f"{cfg.data.synthetic_train} training videos, {cfg.train.epochs} epochs, {cfg.train.num_workers} workers, "
        f"batch {cfg.train.batch_size} per worker, lr {cfg.train.lr:g}, warm-up {cfg.train.warmup_ratio:g}, dropout "
        f"{cfg.model.dropout:g}). Best checkpoint: epoch {best.get('epoch')}, "
        f"val_loss {best.get('val_loss', float('nan')):.3f}.",
        "",
        f"Captions generated ({cfg.generation.num_beams}-beam search) for the {int(acc['num_videos'])} videos of the "
        "synthetic test split, scored by `stgpt.synthetic.attribute_accuracy` (fraction of objects whose attribute "
        "the caption names right):",
        "",
        "| attribute | accuracy | chance |",
        "| --- | --- | --- |",
        *[f"| {k} | {acc[k]:.1%} | {acc['chance'][k]:.1%} |" for k in ("colour", "shape", "motion")],
        f"| whole object right | {acc['object']:.1%} | {1 / 72:.1%} |",
        f"| whole video right | {acc['video']:.1%} | |",
        "",
        "Examples: " + "; ".join(f"{e['video_id']}: \"{e['prediction']}\"" for e in acc["examples"][:3]) + ".",
    ]
    text = "\n".join(lines)
    print(text)
    if write:
        from benchmarks._results import write_section

        write_section("train-default", text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=1024, help="training videos (the memory run uses 4x)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learn", action="store_true", help="also run the default training job")
    parser.add_argument("--only-learn", action="store_true", help="only run the default training job")
    parser.add_argument("--no-write", action="store_true", help="print, do not update benchmarks/RESULTS.md")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/tiny.yaml")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.only_learn:
        learn(not args.no_write)
        return

    import ray

    # the captioner alone, random-init: a throughput comparison needs no pretraining stages
    base = load_config(CONFIG_DIR / "tiny.yaml", ["model.kind=tiny", *args.overrides])
    from stgpt.launch import start_local_ray

    start_local_ray(num_cpus=max(3, os.cpu_count() or 1), log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = make_shards(base, args.videos)
    cfg4 = make_shards(base, 4 * args.videos)

    # The plain loop runs before and after the 1-worker Ray run and counts as their mean, so a change in the
    # machine's background load during the benchmark does not land on one side of the comparison only.
    before = plain_loop(cfg, args.epochs)
    print("plain", before, flush=True)
    one = ray_loop(cfg, "ray-1", 1, args.epochs)
    print("ray 1 worker", one, flush=True)
    after = plain_loop(cfg, args.epochs)
    print("plain again", after, flush=True)
    plain = {key: (before[key] + after[key]) / 2 for key in ("steady", "whole")}
    two = ray_loop(cfg, "ray-2", 2, args.epochs)
    print("ray 2 workers", two, flush=True)
    four = ray_loop(cfg4, "ray-1-x4", 1, 1)
    print("ray 1 worker, 4x data", four, flush=True)

    t = cfg.train
    lines = [
        "## Training throughput: Ray Train against a plain PyTorch loop",
        "",
        f"{machine_info()}. `python benchmarks/train_bench.py`: configs/tiny.yaml ({cfg.model.hidden_size}-wide, "
        f"{cfg.model.num_layers} layers, {cfg.video.num_frames} frames of {cfg.video.crop_size} px), "
        f"{args.videos} synthetic training videos, {args.epochs} epochs, batch {t.batch_size} per worker, "
        f"{int(t.cpus_per_worker)} thread(s) per worker, fp32 on CPU. Samples/s: median over windows of "
        f"{t.log_every} steps (steady state), and all samples over all epoch time (per-epoch Ray Data start included).",
        "",
        "| loop | samples/s (steady) | vs plain | samples/s (whole epochs) | vs plain |",
        "| --- | --- | --- | --- | --- |",
        f"| plain PyTorch, 1 process (mean of a run before and one after Ray, 1 worker: {before['steady']:.1f} and "
        f"{after['steady']:.1f} steady) | {plain['steady']:.1f} | 1.00 | {plain['whole']:.1f} | 1.00 |",
        f"| Ray Train, 1 worker | {one['steady']:.1f} | {one['steady'] / plain['steady']:.2f} | {one['whole']:.1f} | "
        f"{one['whole'] / plain['whole']:.2f} |",
        f"| Ray Train, 2 workers | {two['steady']:.1f} | {two['steady'] / plain['steady']:.2f} | {two['whole']:.1f} | "
        f"{two['whole'] / plain['whole']:.2f} |",
        "",
        f"Per epoch, Ray Train waited for data {one['data_wait']:.1f} s of {one['epoch_seconds']:.1f} s with 1 worker and "
        f"{two['data_wait']:.1f} s of {two['epoch_seconds']:.1f} s with 2 (most of it Ray Data starting the epoch's "
        "streaming split; the decode threads keep up once it runs).",
        "",
        f"2-worker scaling against 1 worker: {two['steady'] / one['steady']:.2f}x steady, "
        f"{two['whole'] / one['whole']:.2f}x whole epochs (ideal 2x; this machine has {os.cpu_count()} cores, "
        "shared by the two workers, Ray and the decode threads).",
        "",
        f"Peak RSS of the most loaded Ray Train worker: {one['peak_rss_mb']:.0f} MiB on {args.videos} videos, "
        f"{four['peak_rss_mb']:.0f} MiB on {4 * args.videos} videos (the data streams: it does not grow with the "
        f"dataset). Ray run wall times including worker start: {one['run_seconds']:.0f} s, {two['run_seconds']:.0f} s.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        from benchmarks._results import write_section

        write_section("train", text)
    ray.shutdown()
    if args.learn:
        learn(not args.no_write)


if __name__ == "__main__":
    main()
