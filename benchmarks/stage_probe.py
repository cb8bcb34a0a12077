"""Which staged recipe (encoder pretraining, decoder pretraining, captioning) reads time? A single-process probe.

    python benchmarks/stage_probe.py --videos 4096                    # configs/tiny.yaml's pretrain/train settings
    python benchmarks/stage_probe.py --videos 4096 --single-frame      # the control: every frame is frame 0
    python benchmarks/stage_probe.py --enc-epochs 0                    # no encoder pretraining (random encoder)

No Ray, no files but temporary checkpoints: videos rendered in memory (as `learning_probe.py`), then the three
stages of `stgpt.pretraining` in a plain loop with `stgpt.training`'s optimiser and schedule. Prints, per stage,
its time and what it reached: the classifier's attribute accuracy, the language model's loss, and the captioner's
colour / shape / motion accuracy (beam search with `--beams`) forwards and on the test videos played backwards
against the flipped motions. Figures: benchmarks/RESULTS.md ("pretraining stages").
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # learning_probe's helpers

import stgpt.synthetic as synthetic  # noqa: E402
from stgpt.config import CONFIG_DIR, load_config  # noqa: E402
from stgpt.model import build_model, generate_captions, tokenize_captions, train_tokenizer  # noqa: E402
from stgpt.pretraining import (attribute_loss, build_decoder_lm, build_encoder_classifier, label_vector,  # noqa: E402
                               lm_batch, read_labels)
from stgpt.synthetic import first_frame_only, flip_motion, reverse_time  # noqa: E402
from stgpt.training import make_optimizer, make_scheduler  # noqa: E402
from stgpt.transforms import resize_and_crop, to_pixel_values  # noqa: E402
from stgpt.video import sample_indices  # noqa: E402

RENDERED_FRAMES = 32
CACHE = Path(tempfile.gettempdir()) / "stgpt-probe-frames"  # rendered clips, keyed by everything they depend on


def render_sampled(spec, index, size=(128, 128)) -> np.ndarray:
    """`synthetic.render_video(spec)[index]` without rendering the frames the sampler skips."""
    width, height = size
    frames = np.empty((len(index), height, width, 3), dtype=np.uint8)
    frames[:] = synthetic.BACKGROUND
    for i, t in enumerate(index):
        for obj in spec.objects:
            cx, cy, half = synthetic.object_state(obj, t / (RENDERED_FRAMES - 1), size)
            y0, x0, cover = synthetic._coverage(obj.shape, cx, cy, half, height, width)
            box = (i, slice(y0, y0 + cover.shape[0]), slice(x0, x0 + cover.shape[1]))
            region = frames[box].astype(np.float32)
            region += cover[..., None] * (np.asarray(synthetic.COLOURS[obj.colour], np.float32) - region)
            frames[box] = np.round(region).astype(np.uint8)
    return frames


def _render_chunk(job):
    specs, index, travel, size_range = job
    synthetic.TRAVEL, synthetic.SIZE_RANGE = travel, size_range  # the worker process's module
    return np.stack([render_sampled(s, index) for s in specs])  # numpy only: no torch threads in a child


def render_clips(specs, index, short_side: int, crop: int, key: str, processes: int = 2) -> torch.Tensor:
    """(N, T, crop, crop, 3) uint8 clips of `specs`, rendered in `processes` processes, cached under CACHE."""
    import hashlib
    import multiprocessing

    path = CACHE / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".pt")
    if path.exists():
        return torch.load(path)
    chunks = [specs[i:i + 256] for i in range(0, len(specs), 256)]
    jobs = [(c, index, synthetic.TRAVEL, synthetic.SIZE_RANGE) for c in chunks]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        clips = torch.cat([resize_and_crop(torch.from_numpy(part), short_side, crop)
                           for part in pool.map(_render_chunk, jobs)])
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(clips, path)
    return clips


def shift_frames(clip: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """A clip (T, H, W, 3) moved `dy` px down and `dx` px right, the border replicated into the gap (the uniform
    background): the shift augmentation probed for shape (RESULTS.md: it bought nothing, and is not kept)."""
    height, width = clip.shape[1:3]
    pad = ((0, 0), (max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0)), (0, 0))
    y0, x0 = max(-dy, 0), max(-dx, 0)
    return torch.from_numpy(np.pad(clip.numpy(), pad, mode="edge")[:, y0:y0 + height, x0:x0 + width].copy())


def batches(n: int, batch: int, epochs: float, rng: random.Random):
    order: list[int] = []
    for _ in range(int(epochs * n) // batch):
        if len(order) < batch:
            order = rng.sample(range(n), n)
        yield [order.pop() for _ in range(batch)]


def precision(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def step(model, optimizer, schedule, loss, clip=1.0):
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4096)
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--p-two", type=float, default=synthetic.DEFAULT_P_TWO_OBJECTS)
    parser.add_argument("--travel", type=float, default=synthetic.TRAVEL)
    parser.add_argument("--size", type=float, nargs=2, default=synthetic.SIZE_RANGE)
    parser.add_argument("--single-frame", action="store_true", help="the control: all frames are frame 0")
    parser.add_argument("--enc-epochs", type=float, default=None)
    parser.add_argument("--enc-lr", type=float, default=None)
    parser.add_argument("--enc-batch", type=int, default=None)
    parser.add_argument("--dec-epochs", type=float, default=None)
    parser.add_argument("--cap-epochs", type=float, default=None)
    parser.add_argument("--cap-lr", type=float, default=None)
    parser.add_argument("--cap-batch", type=int, default=None)
    parser.add_argument("--enc-scale", type=float, default=None, help="encoder lr / lr in captioning")
    parser.add_argument("--time-init", default="normal", help="encoder time embeddings: normal (std "
                        "pretrain.embedding_std) or sincos (fixed sine-cosine of the frame index, then learned)")
    parser.add_argument("--score-encoder", default=None, metavar="DIR",
                        help="only score an exported encoder stage (e.g. outputs/pretrain/encoder) on the test videos")
    parser.add_argument("--freeze", type=float, default=None, help="captioning: encoder frozen this fraction")
    parser.add_argument("--enc-only", action="store_true", help="stop after the encoder stage")
    parser.add_argument("--reverse-aug", type=float, default=0.0,
                        help="encoder stage: play this fraction of training clips backwards, motions flipped")
    parser.add_argument("--shift", type=int, default=0,
                        help="encoder stage: move each training clip by up to this many px (shift_frames)")
    parser.add_argument("--eval-every", type=int, default=0, help="encoder steps between test accuracy checks")
    parser.add_argument("--beams", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="autocast every stage's forward to bf16 (train.precision)")
    parser.add_argument("--save-encoder", default=None, metavar="DIR", help="save the encoder stage's classifier")
    parser.add_argument("--dump", default=None, metavar="FILE", help="write the test captions (JSON) here")
    parser.add_argument("--encoder", default=None, metavar="DIR", help="start from this saved classifier: no stage 1")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    synthetic.TRAVEL, synthetic.SIZE_RANGE = args.travel, tuple(args.size)
    torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG_DIR / "tiny.yaml", [f"generation.num_beams={args.beams}", *args.overrides])
    p, t = cfg.pretrain, cfg.train
    enc_epochs = p.encoder_epochs if args.enc_epochs is None else args.enc_epochs
    enc_lr = args.enc_lr or p.encoder_lr
    enc_batch = args.enc_batch or p.encoder_batch_size * t.num_workers
    dec_epochs = p.decoder_epochs if args.dec_epochs is None else args.dec_epochs
    cap_epochs = t.epochs if args.cap_epochs is None else args.cap_epochs
    cap_lr = args.cap_lr or t.lr
    cap_batch = args.cap_batch or t.batch_size * t.num_workers
    enc_scale = t.encoder_lr_scale if args.enc_scale is None else args.enc_scale
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)

    start = time.perf_counter()
    plan = synthetic.plan_dataset({"train": args.videos, "test": args.test}, seed=cfg.data.synthetic_seed,
                                  p_two_objects=args.p_two)
    index = sample_indices(RENDERED_FRAMES, cfg.video.num_frames)

    def frames(split):
        key = repr((split, len(plan[split]), cfg.data.synthetic_seed, args.p_two, synthetic.TRAVEL,
                    synthetic.SIZE_RANGE, list(index), cfg.video.short_side, cfg.video.crop_size, synthetic.GROWTH))
        out = render_clips(plan[split], index, cfg.video.short_side, cfg.video.crop_size, key)
        return first_frame_only(out) if args.single_frame else out

    train, test = frames("train"), frames("test")
    test_back = reverse_time(test)
    truth = {s.video_id: s.annotation()["attributes"] for s in plan["test"]}
    flipped = {k: flip_motion(v) for k, v in truth.items()}
    print(f"data: {args.videos} train videos rendered in {time.perf_counter() - start:.0f} s", flush=True)
    report = {}

    if args.score_encoder:  # a Ray stage's export, on the probe's test videos: per object and per motion
        from transformers import AutoModelForVideoClassification

        classifier = AutoModelForVideoClassification.from_pretrained(args.score_encoder)
        for name, clips, refs in (("forward", test, truth), ("backward", test_back, flipped)):
            print(f"ENCODER {name}: {classifier_accuracy(classifier, clips, plan['test'], refs, cfg)}")
            print(f"  named motions of one-object videos: {motion_named(classifier, clips, plan['test'], refs, cfg)}")
        return

    # 1. encoder pretraining
    if args.encoder:
        from transformers import AutoModelForVideoClassification

        classifier = AutoModelForVideoClassification.from_pretrained(args.encoder).train()
        enc_epochs = 0
    else:
        classifier = build_encoder_classifier(cfg, seed=args.seed).train()
    if args.time_init == "sincos":
        from learning_probe import sincos

        with torch.no_grad():
            times = classifier.timesformer.embeddings.time_embeddings
            times[0] = sincos(times.shape[-1], torch.arange(times.shape[1]))
    targets = torch.from_numpy(np.stack([label_vector(s.annotation()["attributes"]["objects"]) for s in plan["train"]]))
    targets_back = torch.from_numpy(np.stack([label_vector(flip_motion(s.annotation()["attributes"])["objects"])
                                              for s in plan["train"]]))
    steps = int(enc_epochs * args.videos) // enc_batch
    if steps:
        optimizer = make_optimizer(classifier, enc_lr, t.weight_decay)
        schedule = make_scheduler(optimizer, steps, t.warmup_ratio)
        start = time.perf_counter()
        for i, batch in enumerate(batches(args.videos, enc_batch, enc_epochs, rng)):
            clips, labels = train[batch], targets[batch]
            if args.reverse_aug:
                back = torch.rand(len(batch)) < args.reverse_aug
                clips = torch.where(back[:, None, None, None, None], clips.flip(1), clips)
                labels = torch.where(back[:, None], targets_back[batch], labels)
            if args.shift:
                moves = torch.randint(-args.shift, args.shift + 1, (len(batch), 2)).tolist()
                clips = torch.stack([shift_frames(c, dy, dx) for c, (dy, dx) in zip(clips, moves)])
            with precision(args.bf16):
                logits = classifier(pixel_values=to_pixel_values(clips, cfg.video)).logits
            loss = attribute_loss(logits, labels)
            step(classifier, optimizer, schedule, loss, t.grad_clip)
            if i % 200 == 0:
                print(f"  encoder step {i}/{steps} loss {loss.item():.4f}", flush=True)
            if args.eval_every and i and i % args.eval_every == 0:
                print(f"  encoder step {i}: test {classifier_accuracy(classifier, test, plan['test'], truth, cfg)}"
                      f" ({time.perf_counter() - start:.0f} s)", flush=True)
        seconds = time.perf_counter() - start
        for name, clips, refs in (("forward", test, truth), ("backward", test_back, flipped)):
            acc = classifier_accuracy(classifier, clips, plan["test"], refs, cfg)
            report[f"encoder_{name}"] = acc
            print(f"ENCODER {name}: {acc}  ({steps} steps, {seconds:.0f} s)", flush=True)
        report["encoder_s"] = round(seconds)
    if args.save_encoder:
        classifier.save_pretrained(args.save_encoder)
    if args.enc_only:
        print(f"RESULT {' '.join(sys.argv[1:])}: {report}")
        return

    # 2. decoder pretraining
    captions = [list(s.captions) for s in plan["train"]]
    flat = [c for texts in captions for c in texts]
    tokenizer = train_tokenizer(flat, cfg.model.vocab_size)
    lm = build_decoder_lm(cfg, tokenizer, seed=args.seed).train()
    dec_batch = p.decoder_batch_size * t.num_workers
    steps = int(dec_epochs * len(flat)) // dec_batch
    start = time.perf_counter()
    if steps:
        optimizer = make_optimizer(lm, p.decoder_lr, t.weight_decay)
        schedule = make_scheduler(optimizer, steps, t.warmup_ratio)
        for i, batch in enumerate(batches(len(flat), dec_batch, dec_epochs, rng)):
            with precision(args.bf16):
                loss = lm(**lm_batch(tokenizer, [flat[j] for j in batch])).loss
            step(lm, optimizer, schedule, loss, t.grad_clip)
        print(f"DECODER: lm loss {loss.item():.3f} ({steps} steps, {time.perf_counter() - start:.0f} s)", flush=True)
    report["decoder_s"] = round(time.perf_counter() - start)

    # 3. captioning from the two checkpoints, through model.kind=pretrained
    with tempfile.TemporaryDirectory() as tmp:
        classifier.save_pretrained(f"{tmp}/encoder")
        lm.save_pretrained(f"{tmp}/decoder")
        tokenizer.save_pretrained(f"{tmp}/decoder")
        cap_cfg = load_config(CONFIG_DIR / "tiny.yaml", [f"generation.num_beams={args.beams}", *args.overrides,
                                                        "model.kind=pretrained", f"model.encoder={tmp}/encoder",
                                                        f"model.decoder={tmp}/decoder"])
        bundle = build_model(cap_cfg)
    model = bundle.model.train()
    steps = int(cap_epochs * args.videos) // cap_batch
    optimizer = make_optimizer(model, cap_lr, t.weight_decay, enc_scale)
    schedule = make_scheduler(optimizer, steps, t.warmup_ratio,
                              t.encoder_freeze_ratio if args.freeze is None else args.freeze)
    start = time.perf_counter()
    for i, batch in enumerate(batches(args.videos, cap_batch, cap_epochs, rng)):
        labels = tokenize_captions(bundle.tokenizer, [rng.choice(captions[j]) for j in batch])
        with precision(args.bf16):
            loss = model(pixel_values=to_pixel_values(train[batch], cfg.video), labels=labels).loss
        step(model, optimizer, schedule, loss, t.grad_clip)
        if i % 200 == 0:
            print(f"  caption step {i}/{steps} loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    for name, clips, refs in (("forward", test, truth), ("backward", test_back, flipped)):
        predictions = {}
        for i in range(0, len(clips), 32):
            texts = generate_captions(bundle, to_pixel_values(clips[i:i + 32], cfg.video))
            predictions.update({s.video_id: x for s, x in zip(plan["test"][i:i + 32], texts)})
        if args.dump:
            Path(f"{args.dump}.{name}.json").write_text(json.dumps({k: [v, refs[k]] for k, v in predictions.items()}))
        acc = synthetic.attribute_accuracy(predictions, refs)
        per_motion = motion_confusion(predictions, refs)
        report[f"caption_{name}"] = {k: round(acc[k], 3) for k in ("colour", "shape", "motion", "video")}
        print(f"CAPTION {name}: {report[f'caption_{name}']} per motion {per_motion} ({steps} steps, {seconds:.0f} s)")
        print("   e.g.", list(predictions.values())[:3], flush=True)
    report["caption_s"] = round(seconds)
    print(f"RESULT {' '.join(sys.argv[1:]) or '(defaults)'}: {report}")


def classifier_accuracy(classifier, clips, specs, refs, cfg) -> dict:
    """Per-object colour / shape / motion accuracy of the classifier's logits (and per-motion, one object)."""
    classifier.eval()
    with torch.no_grad():
        logits = torch.cat([classifier(pixel_values=to_pixel_values(clips[i:i + 64], cfg.video)).logits
                            for i in range(0, len(clips), 64)])
    classifier.train()
    named = {s.video_id: read_labels(logits[j], len(refs[s.video_id]["objects"])) for j, s in enumerate(specs)}
    return score_objects(named, refs)


def motion_named(classifier, clips, specs, refs, cfg) -> dict:
    """Per true motion of one-object videos, how often the classifier names each motion."""
    with torch.no_grad():
        logits = torch.cat([classifier.eval()(pixel_values=to_pixel_values(clips[i:i + 64], cfg.video)).logits
                            for i in range(0, len(clips), 64)])
    named: dict = {}
    for j, s in enumerate(specs):
        objects = refs[s.video_id]["objects"]
        if len(objects) == 1:
            got = read_labels(logits[j], 1)[0]["motion"]
            named.setdefault(objects[0]["motion"], Counter())[got] += 1
    return {m: dict(named[m].most_common()) for m in synthetic.MOTIONS if m in named}


AXIS = {"left": "x", "right": "x", "up": "y", "down": "y", "grow": "size", "shrink": "size"}


def score_objects(named: dict, refs: dict) -> dict:
    hits, total, two = Counter(), 0, 0
    for video_id, guesses in named.items():
        for true in refs[video_id]["objects"]:
            total += 1
            two += len(refs[video_id]["objects"]) == 2
            match = next((g for g in guesses if g["colour"] == true["colour"]), None)
            hits["axis"] += match is not None and AXIS[match["motion"]] == AXIS[true["motion"]]
            for key in ("colour", "shape", "motion"):
                hits[key] += match is not None and match[key] == true[key]
                if len(refs[video_id]["objects"]) == 2:
                    hits[key + "2"] += match is not None and match[key] == true[key]
    out = {key: round(hits[key] / total, 3) for key in ("colour", "shape", "motion", "axis")}
    out.update({key + "2": round(hits[key + "2"] / max(two, 1), 3) for key in ("shape", "motion")})
    return out


def motion_confusion(predictions: dict, refs: dict) -> dict:
    """Per true motion, the fraction of one-object videos whose caption names it."""
    right, seen = Counter(), Counter()
    for video_id, text in predictions.items():
        objects = refs[video_id]["objects"]
        if len(objects) == 1:
            named = synthetic.parse_caption(text)["objects"]
            seen[objects[0]["motion"]] += 1
            right[objects[0]["motion"]] += bool(named) and named[0]["motion"] == objects[0]["motion"]
    return {m: round(right[m] / seen[m], 2) for m in synthetic.MOTIONS if seen[m]}


if __name__ == "__main__":
    main()
