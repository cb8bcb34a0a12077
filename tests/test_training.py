"""Training: the data path (bad rows, caption draws), the resumable state, and whole Ray Train runs.

The distributed run trains 2 workers on the session's simulated cluster on shards written by the preprocessing
library (two bad rows added), has a worker kill itself mid-epoch once, and checks that the run finishes from its
last checkpoint, that training learned, and what it leaves behind. The job test submits jobs/train.py to a real
`ray start` cluster with `ray job submit`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stgpt.config import CONFIG_DIR, load_config
from stgpt.shards import SCHEMA, encode_frames, list_shards
from stgpt.shard_data import caption_index, collate_rows, table_columns
from stgpt.trainer import run_training
from stgpt.training import (
    STATE_FILE,
    Progress,
    load_training_state,
    make_optimizer,
    make_scheduler,
    save_training_state,
    steps_per_epoch,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FRAMES, SIZE = 8, 32
# A model and video size that train in seconds; the rest of configs/tiny.yaml as it is.
# model.kind=tiny: the captioner alone, random-init (the default's pretraining stages: tests/test_pretraining.py)
SMALL = ["model.kind=tiny", f"video.num_frames={FRAMES}", f"video.short_side={SIZE}", f"video.crop_size={SIZE}",
         "model.hidden_size=32",
         "model.num_layers=1", "model.num_heads=2", "model.patch_size=16", "model.vocab_size=256",
         "generation.num_beams=2", "generation.max_new_tokens=12"]


# 16 training videos (+2 bad rows added below), 6 for validation, 2 for test
DATA = ["data.synthetic_train=16", "data.synthetic_validation=6", "data.synthetic_test=2", "data.synthetic_seed=3"]


def small_config(tmp: Path, shards: Path, root: Path, *overrides: str):
    return load_config(CONFIG_DIR / "tiny.yaml", [*SMALL, *DATA, f"data.shards={shards}", f"data.root={root}",
                                                  f"train.output_dir={tmp}", *overrides])


# ----------------------------------------------------------------------------------------------------------
# Data path, no Ray


def _row(video_id: str, frames: np.ndarray, captions: list[str], encoding: str = "jpeg") -> dict:
    return {"video_id": video_id, "split": "train", "frames": encode_frames(frames, encoding), "encoding": encoding,
            "height": frames.shape[1], "width": frames.shape[2], "frame_indices": list(range(len(frames))),
            "num_source_frames": len(frames), "captions": captions}


def test_collate_rows_skips_and_reports_bad_rows():
    from stgpt.model import train_tokenizer

    captions = ["a red ball rises.", "a red dot moves up."]
    tokenizer = train_tokenizer(captions + ["a blue box falls."], vocab_size=300)
    video_cfg = load_config(CONFIG_DIR / "tiny.yaml", SMALL).video
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    rows = [
        _row("good", video, captions, encoding="raw"),
        _row("short", video[:5], ["a caption"]),  # wrong frame count
        _row("silent", video, []),  # no captions
        {**_row("broken", video, ["x"]), "frames": [b"not a jpeg"] * FRAMES},
        _row("large", rng.integers(0, 255, (FRAMES, 48, 64, 3), dtype=np.uint8), ["resized"], encoding="raw"),
    ]
    batch = collate_rows(table_columns(pa.Table.from_pylist(rows, schema=SCHEMA)), tokenizer, video_cfg, 0, 0)
    assert batch.video_ids == ["good", "large"] and batch.num_ok == 2
    assert [v for v, _ in batch.bad] == ["short", "silent", "broken"]
    assert "expected 8" in batch.bad[0][1] and "no captions" in batch.bad[1][1] and "decode" in batch.bad[2][1]
    assert batch.frames.shape == (2, FRAMES, SIZE, SIZE, 3) and batch.frames.dtype == torch.uint8
    np.testing.assert_array_equal(batch.frames[0].numpy(), video)  # raw frames come back exactly
    assert batch.references[0] == captions
    drawn = tokenizer.decode([t for t in batch.labels[0].tolist() if t >= 0], skip_special_tokens=True).strip()
    assert drawn == captions[caption_index(0, 0, "good", 2)]
    assert batch.decoder_attention_mask[0].sum() == (batch.labels[0] != -100).sum()  # start token + all but eos

    only_bad = collate_rows(table_columns(pa.Table.from_pylist(rows[1:3], schema=SCHEMA)), tokenizer, video_cfg, 0, 0)
    assert (only_bad.num_ok, len(only_bad.bad), only_bad.frames.shape[0]) == (0, 2, 1)  # a blank row, weight 0


def test_every_caption_mode_makes_one_row_per_caption():
    from stgpt.shard_data import _one_row_per_caption

    split = _one_row_per_caption()
    rows = split({"video_id": "v", "frames": [b"x"], "captions": ["one.", "two.", " "]})
    assert [r["captions"] for r in rows] == [["one."], ["two."]] and all(r["frames"] == [b"x"] for r in rows)
    assert split({"video_id": "w", "captions": []}) == [{"video_id": "w", "captions": []}]  # kept, to be counted


def test_caption_draw_is_seeded_per_epoch_and_covers_the_captions():
    draws = [caption_index(7, epoch, "video_1", 10) for epoch in range(60)]
    assert draws == [caption_index(7, epoch, "video_1", 10) for epoch in range(60)]  # no hidden state
    assert all(0 <= d < 10 for d in draws) and len(set(draws)) >= 8  # varies over epochs
    assert [caption_index(8, e, "video_1", 10) for e in range(60)] != draws  # the seed matters
    assert [caption_index(7, e, "video_2", 10) for e in range(60)] != draws  # videos draw independently


def test_steps_per_epoch_follows_the_equal_split():
    assert steps_per_epoch(18, 2, 4, 1) == 3  # 9 rows per worker: batches of 4, 4, 1
    assert steps_per_epoch(19, 2, 4, 1) == 3  # the odd row is dropped so workers stay in step
    assert steps_per_epoch(18, 2, 4, 2) == 2  # accumulation: 3 batches make 2 optimiser steps
    assert steps_per_epoch(100, 1, 8, 1) == 13


def test_training_state_round_trip_resumes_the_same_trajectory(tmp_path):
    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1)
        return model, optimizer, make_scheduler(optimizer, total_steps=10, warmup_ratio=0.3), \
            torch.amp.GradScaler("cpu", enabled=False)

    def step(model, optimizer, scheduler, i):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(i))
        model(x).square().mean().backward()
        optimizer.step(), optimizer.zero_grad(), scheduler.step()

    model, optimizer, scheduler, scaler = setup()
    for i in range(4):
        step(model, optimizer, scheduler, i)
    save_training_state(tmp_path, optimizer, scheduler, scaler, Progress(epoch=2, batch=1, step=4))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, optimizer, scheduler, 4)
    expected = model.state_dict()

    model2, optimizer2, scheduler2, scaler2 = setup()
    model2.load_state_dict(weights)
    progress = load_training_state(tmp_path, optimizer2, scheduler2, scaler2)
    assert progress == Progress(epoch=2, batch=1, step=4)
    assert scheduler2.last_epoch == 4
    assert len(optimizer2.state) == len(optimizer.state) > 0  # Adam moments came back
    step(model2, optimizer2, scheduler2, 4)
    for key, value in expected.items():  # same moments, same schedule: the same next step
        torch.testing.assert_close(model2.state_dict()[key], value)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert (tmp_path / STATE_FILE).exists()


def test_schedule_warms_up_then_decays_to_zero():
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    scheduler = make_scheduler(optimizer, total_steps=20, warmup_ratio=0.2)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step(), scheduler.step()
    peak = lrs.index(max(lrs))
    assert peak == 4 and lrs[:peak] == sorted(lrs[:peak]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] < 0.1 and scheduler.get_last_lr()[0] == 0.0


# ----------------------------------------------------------------------------------------------------------
# Whole runs on Ray


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory, ray_cluster):
    """The synthetic dataset made and preprocessed as the default job does it (stgpt.preprocessing underneath),
    then two bad rows appended to the train shard."""
    from stgpt.trainer import prepare_synthetic_shards

    base = tmp_path_factory.mktemp("train-data")
    root, shards = base / "data", base / "shards"
    prepare_synthetic_shards(small_config(base / "unused", shards, root), log=lambda _: None)

    (train_path,) = list_shards(shards, "train")
    table = pq.read_table(train_path)
    good = table.slice(0, 1).to_pylist()[0]
    bad = [{**good, "video_id": "bad_short", "frames": good["frames"][:3]},  # wrong frame count
           {**good, "video_id": "bad_no_captions", "captions": []}]
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist(bad, schema=table.schema)]), train_path)
    return root, shards


class KillOnce:
    """Training hook: rank 1 dies (no cleanup, like SIGKILL) after the given batch, once across restarts, when Ray
    has registered the checkpoints reported so far (so which one the run resumes from is not a race)."""

    def __init__(self, marker: str, epoch: int, batch: int):
        self.marker, self.epoch, self.batch = marker, epoch, batch

    def __call__(self, progress: dict) -> None:
        if progress["rank"] == 1 and progress["epoch"] == self.epoch and progress["batch"] == self.batch \
                and not os.path.exists(self.marker):
            import ray.train

            ray.train.get_all_reported_checkpoints()
            Path(self.marker).write_text(json.dumps(progress))
            os._exit(1)


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_distributed_training_survives_a_killed_worker_and_learns(tmp_path, synthetic_shards):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    root, shards = synthetic_shards
    marker = tmp_path / "killed.json"
    cfg = small_config(tmp_path / "run", shards, root, "train.num_workers=2", "train.epochs=3", "train.batch_size=4",
                       "train.lr=2e-2", "train.warmup_ratio=0.1", "train.log_every=1", "train.keep_checkpoints=1",
                       "train.checkpoint_every_steps=1", "train.max_failures=1", "train.shuffle_buffer=8")
    # 18 train rows (2 bad) -> 9 per worker -> batches of 4, 4, 1: 3 steps an epoch. Rank 1 dies after the second
    # step of epoch 1, right after reporting the mid-epoch checkpoint of that step.
    logged: list[str] = []
    result = run_training(cfg, hooks=[KillOnce(str(marker), epoch=1, batch=2)], log=logged.append)

    assert marker.exists(), "the worker was never killed"
    started, finished = result.return_value["started"], result.return_value["finished"]
    # resumed inside epoch 1 from the mid-epoch checkpoint of step 5, with its data position, schedule, optimiser
    assert started["resumed"] and (started["epoch"], started["batch"], started["step"]) == (1, 2, 5), started
    assert started["scheduler_step"] == 5 and started["optimizer_state_entries"] > 0  # not a fresh optimiser
    assert finished == {"epoch": 3, "batch": 0, "step": 9} and result.return_value["world_size"] == 2

    last = result.last_metrics
    assert last["epoch"] == 2 and last["bad_rows"] == 2 and last["samples"] == 16  # bad rows skipped, counted
    # the driver showed each epoch as it finished, once (the killed attempt died inside epoch 2, before its line)
    shown = [line.split(":")[0] for line in logged if line.startswith("epoch ")]
    assert shown == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], logged
    assert "val_loss" in next(line for line in logged if line.startswith("epoch 3/3"))

    # learned: the loss fell well below where it started
    scalars = _scalars(tmp_path / "run" / "tensorboard")
    assert {"step/train_loss", "step/lr", "step/samples_per_s", "epoch/val_loss", "epoch/train_loss"} <= set(scalars)
    first_loss = scalars["step/train_loss"][0][1]
    assert first_loss > 4.5 and last["train_loss"] < 0.7 * first_loss, (first_loss, last["train_loss"])
    assert last["val_loss"] < scalars["epoch/val_loss"][0][1]
    steps = [s for s, _ in scalars["step/lr"]]
    assert steps == list(range(1, 10))  # once each: what the killed attempt logged after step 5 was purged

    # the best checkpoint: plain transformers loads and runs it, without the training state
    best = result.best_dir
    assert best == tmp_path / "run" / "best" and not (best / STATE_FILE).exists()
    assert result.best_metrics["val_loss"] == pytest.approx(min(v for _, v in scalars["epoch/val_loss"]), rel=1e-6)
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(best)
    tokenizer = AutoTokenizer.from_pretrained(best)
    processor = AutoImageProcessor.from_pretrained(best)
    assert processor.crop_size["height"] == SIZE and model.generation_config.num_beams == 2
    out = model.generate(pixel_values=torch.zeros(1, FRAMES, 3, SIZE, SIZE), max_new_tokens=4)
    assert isinstance(tokenizer.decode(out[0], skip_special_tokens=True), str)
    kept = [p for p in (tmp_path / "run" / "ray").iterdir() if p.is_dir()]
    assert 1 <= len(kept) <= 2, kept  # the best one and the latest

    # running the job again on the same output_dir, one more epoch asked: it resumes after epoch 2
    again = run_training(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=4)), log=lambda _: None)
    started = again.return_value["started"]
    assert started["resumed"] and (started["epoch"], started["batch"], started["step"]) == (3, 0, 9), started
    assert again.return_value["finished"] == {"epoch": 4, "batch": 0, "step": 12} and again.last_metrics["epoch"] == 3


def test_epoch_progress_shows_new_whole_lines_only(tmp_path):
    from stgpt.train_log import EpochProgress

    path = tmp_path / "epochs.jsonl"
    line = {"epoch": 0, "train_loss": 2.5, "val_loss": 2.25, "samples_per_s": 120.4, "epoch_seconds": 8.6}
    path.write_text(json.dumps(line) + "\n")  # an earlier run's: not shown again
    shown: list[str] = []
    with EpochProgress(path, epochs=3, log=shown.append, interval_s=0.05) as progress:
        with open(path, "a") as out:
            out.write(json.dumps({**line, "epoch": 1, "bad_rows": 2}) + "\n" + json.dumps({**line, "epoch": 2})[:20])
            out.flush()
            deadline = time.time() + 10
            while not shown and time.time() < deadline:
                time.sleep(0.05)
            assert shown == ["epoch 2/3: train_loss 2.5, val_loss 2.25, 120 samples/s, 9 s, 2 bad rows skipped"]
            out.write(json.dumps({**line, "epoch": 2})[20:] + "\n")  # the rest of the half-written line
    assert shown[1:] == ["epoch 3/3: train_loss 2.5, val_loss 2.25, 120 samples/s, 9 s"] and progress.offset == path.stat().st_size


@pytest.mark.slow
def test_train_then_evaluate_jobs_submitted_to_a_ray_cluster(tmp_path, synthetic_shards):
    from local_cluster import local_ray_cluster

    root, shards = synthetic_shards
    out = tmp_path / "job"
    # the original's every caption every epoch, gradient accumulation and CIDEr-D on validation videos, on the way
    command = ["python", "jobs/train.py", "--config", "configs/tiny.yaml", *SMALL, *DATA, f"data.root={root}",
               f"data.shards={shards}", f"train.output_dir={out}", "train.num_workers=1", "train.epochs=1",
               "train.batch_size=8", "train.all_captions_each_epoch=true", "train.grad_accum_steps=2",
               "train.val_cider_videos=4"]
    job_id = f"stgpt-train-{uuid.uuid4().hex[:8]}"
    with local_ray_cluster(num_workers=1, cpus_per_node=1) as cluster:
        # RAY_API_SERVER_ADDRESS: Ray Train's placement-group cleaner must ask this cluster, not the newest Ray on
        # the machine (see stgpt.launch.start_local_ray)
        env = json.dumps({"env_vars": {"RAY_API_SERVER_ADDRESS": cluster.dashboard_url}})
        finished = cluster.job_submit(command, working_dir=REPO_ROOT, timeout=480, runtime_env_json=env,
                                      extra_args=["--submission-id", job_id])
        status = subprocess.run([cluster.ray_executable, "job", "status", "--address", cluster.dashboard_url, job_id],
                                env=cluster.env, capture_output=True, text=True, timeout=60)
        # the next step of the workflow on the same cluster: evaluate the exported checkpoint on the test split
        scored = None
        if finished.returncode == 0:
            evaluation = ["python", "jobs/evaluate.py", "--config", "configs/tiny.yaml", *SMALL, "--checkpoint",
                          str(out / "best"), "--data", str(shards), "--output", str(tmp_path / "eval"),
                          "evaluate.num_actors=1", "evaluate.metric_workers=1", "evaluate.metrics=[CIDEr-D,ROUGE-L]"]
            scored = cluster.job_submit(evaluation, working_dir=REPO_ROOT, timeout=300)
    assert finished.returncode == 0, finished.stdout[-4000:]
    assert f"Job '{job_id}' succeeded" in status.stdout, status.stdout + status.stderr  # status SUCCEEDED
    assert "best checkpoint:" in finished.stdout and "motion" in finished.stdout  # the job's own report
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best_metrics"]
    assert summary["best_dir"] == str(out / "best")
    # 16 videos x 10 captions; the bad rows count once per caption row (10 for the short one, 1 with none)
    assert best["samples"] == 160 and best["bad_rows"] == 11
    assert best["step"] == 11  # 171 rows in batches of 8: 22 batches, 2 per optimiser step
    assert best["val_cider_videos"] == 4 and best["val_cider"] >= 0
    assert (out / "best" / "model.safetensors").exists() and (out / "best" / "tokenizer.json").exists()
    assert set(summary["test_accuracy"]) >= {"colour", "shape", "motion"}
    assert scored is not None and scored.returncode == 0, scored.stdout[-4000:]
    assert "CIDEr-D" in scored.stdout  # the job's table, in the submitted job's logs
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(out / "best") and metrics["untrained"] is False, metrics
    assert metrics["counts"]["predictions"] == 2 and sum(metrics["nodes"].values()) == 2, metrics


@pytest.mark.slow
def test_max_steps_stops_mid_epoch_and_a_larger_limit_continues_there(tmp_path, synthetic_shards):
    root, shards = synthetic_shards
    cfg = small_config(tmp_path / "run", shards, root, "train.num_workers=2", "train.epochs=3", "train.batch_size=4",
                       "train.max_steps=4", "train.warmup_ratio=0", "train.log_every=1", "train.shuffle_buffer=0")
    # 18 rows -> 9 per worker -> 3 steps an epoch: step 4 is the first batch of epoch 1
    result = run_training(cfg, log=lambda _: None)
    assert result.return_value["finished"] == {"epoch": 1, "batch": 1, "step": 4}
    assert result.last_metrics["epoch"] == 1 and result.last_metrics["step"] == 4 and "val_loss" in result.last_metrics
    assert result.last_metrics["lr"] == 0.0  # the schedule ran over the 4 steps, not 3 epochs
    assert result.best_dir is not None and (result.best_dir / "config.json").exists()

    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=5))
    again = run_training(more, log=lambda _: None)
    started = again.return_value["started"]
    assert (started["epoch"], started["batch"], started["step"]) == (1, 1, 4), started  # the rest of epoch 1
    assert again.return_value["finished"] == {"epoch": 1, "batch": 2, "step": 5}
