"""The tiny recipe's stages (stgpt/pretraining.py) and the proofs that a captioner reads time.

Fast tests: the time-reversal and single-frame transforms, the attribute targets and the loss.
The stage pipeline runs for real on the session's Ray cluster, on a model and dataset that take seconds.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stgpt import synthetic
from stgpt.config import CONFIG_DIR, load_config
from stgpt.evaluation import time_reversal_check
from stgpt.pretraining import LABELS, attribute_loss, label_vector, read_labels, run_pretraining
from stgpt.synthetic import first_frame_only, flip_motion, reverse_time

SMALL = ["video.num_frames=8", "video.short_side=32", "video.crop_size=32", "model.hidden_size=32",
         "model.num_layers=1", "model.num_heads=2", "model.patch_size=16", "model.vocab_size=256", "generation.num_beams=2",
         "generation.max_new_tokens=12", "data.synthetic_train=16", "data.synthetic_validation=4",
         "data.synthetic_test=2", "pretrain.encoder_epochs=1", "pretrain.decoder_epochs=1",
         "pretrain.encoder_batch_size=4", "pretrain.decoder_batch_size=16"]


def clip(num_frames: int = 8) -> np.ndarray:
    """Frames whose every pixel holds its frame's index."""
    return np.broadcast_to(np.arange(num_frames, dtype=np.uint8)[:, None, None, None], (num_frames, 4, 4, 3)).copy()


def test_reverse_time_plays_the_clip_backwards_for_arrays_and_tensors():
    frames = clip()
    assert [int(f[0, 0, 0]) for f in reverse_time(frames)] == list(range(7, -1, -1))
    batch = torch.from_numpy(np.stack([frames, frames]))  # (B, T, H, W, C)
    assert reverse_time(batch)[:, :, 0, 0, 0].tolist() == [list(range(7, -1, -1))] * 2
    assert np.array_equal(reverse_time(reverse_time(frames)), frames)


def test_flip_motion_swaps_each_motion_with_its_opposite_and_keeps_the_rest():
    objects = [{"colour": "red", "shape": "circle", "motion": m} for m in synthetic.MOTIONS]
    flipped = flip_motion({"objects": objects})["objects"]
    assert [o["motion"] for o in flipped] == ["right", "left", "down", "up", "shrink", "grow"]
    assert all(o["colour"] == "red" and o["shape"] == "circle" for o in flipped)
    assert flip_motion(flip_motion({"objects": objects}))["objects"] == objects


def test_first_frame_only_repeats_frame_zero():
    frames = clip()
    still = first_frame_only(frames)
    assert still.shape == frames.shape and not still[:, 0, 0, 0].any()
    tensor = first_frame_only(torch.from_numpy(np.stack([frames, frames + 1])))
    assert tensor[:, :, 0, 0, 0].tolist() == [[0] * 8, [1] * 8]


def test_single_frame_control_dataset_has_still_videos_with_the_same_captions(tmp_path):
    from stgpt.video import read_video

    counts = {"train": 2}
    moving = synthetic.make_synthetic_dataset(tmp_path / "moving", counts, size=(64, 64), num_frames=8)
    still = synthetic.make_synthetic_dataset(tmp_path / "still", counts, size=(64, 64), num_frames=8,
                                             single_frame=True)
    assert moving.entries("train") == still.entries("train")  # same captions and attributes
    for video_id in moving.video_ids("train"):
        a = read_video(moving.video_path(video_id), 8).frames.astype(int)
        b = read_video(still.video_path(video_id), 8).frames.astype(int)
        assert np.abs(a[0] - b[0]).mean() < 2  # the control's frames are the video's frame 0 ...
        assert max(np.abs(f - b[0]).mean() for f in b) < 2  # ... every one of them
        assert np.abs(a[-1] - a[0]).mean() > 2  # while the real video moves


def test_time_reversal_check_scores_backward_captions_against_flipped_motions():
    attributes = {"a": {"objects": [{"colour": "red", "shape": "circle", "motion": "left"}]},
                  "b": {"objects": [{"colour": "blue", "shape": "square", "motion": "grow"}]}}
    forward = {"a": "A red circle moves to the left.", "b": "A blue square grows."}
    reads_time = {"a": "A red circle moves to the right.", "b": "A blue square shrinks."}
    check = time_reversal_check(forward, reads_time, attributes)
    assert check["motion"] == 1.0 and check["flips_with_video"] == 1.0 and check["colour"] == 1.0
    blind = time_reversal_check(forward, forward, attributes)  # the same caption whichever way the video runs
    assert blind["motion"] == 0.0 and blind["flips_with_video"] == 0.0 and blind["shape"] == 1.0


def test_time_reversal_decode_stage_plays_each_clip_backwards_and_passes_errors_on():
    from stgpt.config import VideoConfig
    from stgpt.evaluation import decode_reversed
    from stgpt.pipeline import row

    video = VideoConfig(num_frames=8, short_side=4, crop_size=4)

    def decode(batch, video):
        yield row("a", "a.mp4", 0, "window", frames=clip().tobytes(), indices=range(8), num_source=8)
        yield row("b", "b.mp4", 0, "error", error="bad video")

    window, error = decode_reversed({}, decode, video=video)
    frames = np.frombuffer(window["frames"][0], np.uint8).reshape(8, 4, 4, 3)
    assert frames[:, 0, 0, 0].tolist() == list(range(7, -1, -1))
    assert window["frame_indices"] == [list(range(7, -1, -1))] and window["video_id"] == ["a"]
    assert error["kind"] == ["error"] and error["error"] == ["bad video"]


def test_attribute_targets_round_trip_and_the_loss_prefers_the_truth():
    objects = [{"colour": "green", "shape": "triangle", "motion": "down"},
               {"colour": "red", "shape": "square", "motion": "shrink"}]
    target = torch.from_numpy(label_vector(objects))[None]
    logits = torch.full((1, len(LABELS)), -4.0)
    for obj in objects:
        logits[0, LABELS.index(f"{obj['colour']} {obj['shape']}")] = 4.0
        logits[0, LABELS.index(f"{obj['colour']} {obj['motion']}")] = 4.0
    assert sorted(read_labels(logits[0], 2), key=lambda o: o["colour"]) == sorted(objects, key=lambda o: o["colour"])
    wrong = logits.clone()
    wrong[0, LABELS.index("green down")], wrong[0, LABELS.index("green up")] = -4.0, 4.0
    assert attribute_loss(logits, target) < attribute_loss(wrong, target)


def test_encoder_learns_at_its_fraction_of_the_learning_rate():
    from stgpt.training import make_optimizer, make_scheduler

    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(3, 3), "decoder": torch.nn.Linear(3, 3)})
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1, encoder_lr_scale=0.1)
    scheduler = make_scheduler(optimizer, total_steps=10, warmup_ratio=0.0)
    encoder = {id(p) for p in model["encoder"].parameters()}
    for group in optimizer.param_groups:
        is_encoder = {id(p) in encoder for p in group["params"]}
        assert len(is_encoder) == 1
        assert group["lr"] == pytest.approx(1e-4 if is_encoder.pop() else 1e-3)
        assert group["weight_decay"] == (0.1 if group["params"][0].ndim >= 2 else 0.0)
    optimizer.step(), scheduler.step()
    assert sorted(scheduler.get_last_lr()) == pytest.approx([0.9e-4, 0.9e-4, 0.9e-3, 0.9e-3])  # both decay alike


def test_frozen_encoder_does_not_learn_for_its_fraction_of_the_steps_then_follows_the_schedule():
    from stgpt.training import make_optimizer, make_scheduler

    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(3, 3), "decoder": torch.nn.Linear(3, 3)})
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.0, encoder_lr_scale=0.5)
    scheduler = make_scheduler(optimizer, total_steps=10, warmup_ratio=0.0, encoder_freeze_ratio=0.3)
    frozen = model["encoder"].weight.detach().clone()
    rates = []
    for _ in range(5):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step(), scheduler.step()
        rates.append({g["encoder"]: g["lr"] for g in optimizer.param_groups})
        if len(rates) < 3:
            assert torch.equal(model["encoder"].weight, frozen)  # no update while frozen (AdamW at lr 0)
    assert [r[True] for r in rates] == pytest.approx([0, 0, 0.5e-3 * 0.7, 0.5e-3 * 0.6, 0.5e-3 * 0.5])
    assert [r[False] for r in rates] == pytest.approx([1e-3 * f for f in (0.9, 0.8, 0.7, 0.6, 0.5)])
    assert not torch.equal(model["encoder"].weight, frozen)


def test_a_still_encoder_is_left_out_of_the_backward_pass_with_the_same_loss():
    from stgpt.model import build_model, tokenize_captions
    from stgpt.shard_data import Batch
    from stgpt.training import encoder_is_still, forward, make_optimizer, make_scheduler

    cfg = load_config(CONFIG_DIR / "tiny.yaml", [*SMALL, "model.kind=tiny"])
    bundle = build_model(cfg, captions=["a red circle moves to the left", "the blue box rises"] * 20)
    labels = tokenize_captions(bundle.tokenizer, ["a red circle moves to the left", "the blue box rises"])
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, 8, 32, 32, 3), dtype=np.uint8))
    batch = Batch(frames, labels, (labels != -100).long(), ["a", "b"], [[], []], 2, [])
    grads = {}
    for still in (False, True):
        bundle.model.zero_grad(set_to_none=True)
        loss = forward(bundle.model, batch, cfg.video, torch.device("cpu"), still_encoder=still)
        loss.backward()
        grads[still] = (loss.item(), {n: p.grad for n, p in bundle.model.named_parameters()})
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)  # the same loss
    for name, grad in grads[True][1].items():
        if name.startswith("encoder."):
            assert grad is None, name  # no encoder gradient computed
        else:
            assert grad is not None and torch.allclose(grad, grads[False][1][name], atol=1e-6), name

    # Still while the schedule holds the encoder at 0: the first 3 of 10 steps here, then learning.
    optimizer = make_optimizer(bundle.model, lr=1e-3, weight_decay=0.0, encoder_lr_scale=0.1)
    scheduler = make_scheduler(optimizer, total_steps=10, warmup_ratio=0.0, encoder_freeze_ratio=0.3)
    phases = []
    for _ in range(5):
        phases.append(encoder_is_still(optimizer))
        optimizer.step(), scheduler.step()
    assert phases == [True, True, True, False, False]
    assert not encoder_is_still(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.0))  # no encoder group


def test_time_reversal_augmentation_plays_clips_backwards_with_flipped_targets():
    from stgpt.config import VideoConfig
    from stgpt.pretraining import _video_batch, plays_backwards
    from stgpt.shards import encode_frames

    draws = [plays_backwards(0, epoch, f"v{i}", 0.5) for epoch in range(2) for i in range(200)]
    assert 0.4 < np.mean(draws) < 0.6 and draws == [plays_backwards(0, e, f"v{i}", 0.5) for e in range(2)
                                                    for i in range(200)]  # a pure function: resumes see the same
    assert not any(plays_backwards(0, 0, f"v{i}", 0.0) for i in range(50))
    video = VideoConfig(num_frames=8, short_side=16, crop_size=16)
    frames = np.broadcast_to((np.arange(8, dtype=np.uint8) * 30)[:, None, None, None], (8, 16, 16, 3)).copy()
    rows = {"video_id": ["v"], "frames": [encode_frames(frames)], "encoding": ["jpeg"], "height": [16], "width": [16]}
    objects = {"v": [{"colour": "red", "shape": "circle", "motion": "left"}]}
    forward = _video_batch(rows, objects, video)
    backward = _video_batch(rows, objects, video, reverse=1.0)
    assert torch.equal(backward["pixel_values"], forward["pixel_values"].flip(1))
    assert backward["labels"].tolist() == [label_vector(flip_motion({"objects": objects["v"]})["objects"]).tolist()]


def small_config(base: Path, *extra: str):
    return load_config(CONFIG_DIR / "tiny.yaml", [
        *SMALL, f"data.root={base / 'data'}", f"data.shards={base / 'shards'}", f"train.output_dir={base / 'train'}",
        f"pretrain.output_dir={base / 'pretrain'}", f"model.encoder={base / 'pretrain' / 'encoder'}",
        f"model.decoder={base / 'pretrain' / 'decoder'}", *extra])


@pytest.mark.slow
def test_stages_run_resume_skip_and_load_as_model_kind_pretrained(ray_cluster, tmp_path):
    from stgpt.model import build_model
    from stgpt.trainer import prepare_synthetic_shards

    cfg = small_config(tmp_path)
    prepare_synthetic_shards(cfg, log=lambda _: None)
    lines: list[str] = []
    captioning, results = run_pretraining(cfg, log=lines.append)
    assert {name: r.skipped for name, r in results.items()} == {"encoder": False, "decoder": False}
    encoder, decoder = Path(captioning.model.encoder), Path(captioning.model.decoder)
    assert encoder.is_absolute() and (encoder / "model.safetensors").exists()
    assert (decoder / "tokenizer.json").exists() and "training_state.pt" not in {p.name for p in encoder.iterdir()}
    assert json.loads((encoder / "config.json").read_text())["architectures"] == ["TimesformerForVideoClassification"]
    assert any(line.startswith("[encoder] epoch 1/1") for line in lines), lines

    # The captioner is built from the two local checkpoints on model.kind=pretrained's path, as from hub ids.
    bundle = build_model(captioning)
    encoder_weights = {k: v for k, v in bundle.model.encoder.state_dict().items()}
    from transformers import AutoModelForVideoClassification

    classifier = AutoModelForVideoClassification.from_pretrained(encoder)
    assert all(torch.equal(encoder_weights[k], v) for k, v in classifier.timesformer.state_dict().items())
    assert len(bundle.tokenizer) == bundle.model.config.decoder.vocab_size

    # Finished stages are skipped.
    again = run_pretraining(cfg, log=lambda _: None)[1]
    assert all(r.skipped for r in again.values())

    # An interrupted stage resumes: its Ray run holds epoch 1's checkpoint, its export is gone, and it is asked
    # for two epochs. It trains only the second.
    shutil.rmtree(encoder)
    resumed = run_pretraining(small_config(tmp_path, "pretrain.encoder_epochs=2"), log=lambda _: None)[1]
    assert not resumed["encoder"].skipped and resumed["decoder"].skipped
    assert resumed["encoder"].metrics["started_epoch"] == 1 and resumed["encoder"].metrics["epoch"] == 1
    assert (encoder / "config.json").exists()
