"""How fast does the tiny model learn colour, shape and motion? A quick single-process probe for tuning configs/tiny.yaml.

    python benchmarks/learning_probe.py                               # configs/tiny.yaml's model, 32k samples
    python benchmarks/learning_probe.py --lr 1e-3 --batch 8 model.dropout=0.1
    python benchmarks/learning_probe.py --seed 2 --eval-every 500     # another seed, accuracy along the way

No Ray, no files: the synthetic videos are rendered in memory (the frames `jobs/train.py` would read, without the
H.264 round trip), and a plain PyTorch loop trains on them with the same loss, optimiser and schedule as
`stgpt.training` (AdamW, linear warm-up and decay, gradient clipping), drawing one caption per video at random.
It prints the attribute accuracy of the test captions (beam search with `--beams`) and, for one-object videos,
the confusion of true and named motions: whether the model names motions from the video or from the caption
prior. One run takes ~3 minutes on one core. Its figures are in benchmarks/RESULTS.md ("learning probe").
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stgpt.synthetic as synthetic  # noqa: E402
from stgpt.config import CONFIG_DIR, load_config  # noqa: E402
from stgpt.model import build_model, generate_captions, tokenize_captions  # noqa: E402
from stgpt.training import make_optimizer, make_scheduler  # noqa: E402
from stgpt.transforms import resize_and_crop, to_pixel_values  # noqa: E402
from stgpt.video import sample_indices  # noqa: E402

RENDERED_FRAMES = 32  # frames `make_synthetic_dataset` renders per video


def sincos(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Fixed sine-cosine embeddings of integer positions, (len(positions), dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], 1).float()


def init_embeddings(model, how: str) -> None:
    """Alternatives to transformers' TimeSformer init (time embeddings zero, positions std 0.02)."""
    embeddings = model.encoder.embeddings
    with torch.no_grad():
        if how == "sincos":  # 2-D sine-cosine positions (as MAE), 1-D sine-cosine time
            dim, grid = embeddings.position_embeddings.shape[-1], int(round((embeddings.position_embeddings.shape[1] - 1) ** 0.5))
            ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
            embeddings.position_embeddings[0, 0] = 0
            embeddings.position_embeddings[0, 1:] = torch.cat([sincos(dim // 2, ys.reshape(-1)), sincos(dim // 2, xs.reshape(-1))], 1)
            embeddings.time_embeddings[0] = sincos(dim, torch.arange(embeddings.time_embeddings.shape[1]))
        elif how.startswith("normal"):  # normal:STD for both
            std = float(how.split(":")[1])
            torch.nn.init.trunc_normal_(embeddings.position_embeddings, std=std, a=-2 * std, b=2 * std)
            torch.nn.init.trunc_normal_(embeddings.time_embeddings, std=std, a=-2 * std, b=2 * std)
        elif how != "default":
            raise SystemExit(f"unknown --embeddings {how!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32000, help="training samples (video-caption pairs)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: configs/tiny.yaml's")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up fraction; default: the config's")
    parser.add_argument("--videos", type=int, default=1024, help="training videos")
    parser.add_argument("--seed", type=int, default=0, help="model init and sampling seed (the data stays the same)")
    parser.add_argument("--beams", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=0, help="steps between accuracy checks (0: at the end)")
    parser.add_argument("--travel", type=float, default=synthetic.TRAVEL)
    parser.add_argument("--size", type=float, nargs=2, default=synthetic.SIZE_RANGE)
    parser.add_argument("--embeddings", default="default", help="default, sincos or normal:STD")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/tiny.yaml, e.g. model.dropout=0.1")
    args = parser.parse_args()
    synthetic.TRAVEL, synthetic.SIZE_RANGE = args.travel, tuple(args.size)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    torch.set_num_threads(1)
    # model.kind=tiny: the captioner trained from scratch (benchmarks/stage_probe.py probes the staged recipe)
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["model.kind=tiny", f"generation.num_beams={args.beams}",
                                                 *args.overrides])
    lr = args.lr if args.lr is not None else cfg.train.lr
    warmup = args.warmup if args.warmup is not None else cfg.train.warmup_ratio

    plan = synthetic.plan_dataset({"train": args.videos, "test": 128}, seed=cfg.data.synthetic_seed)
    index = sample_indices(RENDERED_FRAMES, cfg.video.num_frames)

    def frames(specs):
        return torch.stack([resize_and_crop(synthetic.render_video(s, num_frames=RENDERED_FRAMES)[index], cfg.video.short_side, cfg.video.crop_size)
                            for s in specs])

    train, test = frames(plan["train"]), frames(plan["test"])
    captions = [list(spec.captions) for spec in plan["train"]]
    bundle = build_model(cfg, [c for texts in captions for c in texts])
    model = bundle.model.train()
    init_embeddings(model, args.embeddings)
    steps = args.samples // args.batch
    optimizer = make_optimizer(model, lr, cfg.train.weight_decay)
    schedule = make_scheduler(optimizer, steps, warmup)
    truth = {spec.video_id: spec.annotation()["attributes"] for spec in plan["test"]}

    def evaluate(step: int) -> dict:
        model.eval()
        predictions = {}
        with torch.no_grad():
            for start in range(0, len(plan["test"]), 32):
                texts = generate_captions(bundle, to_pixel_values(test[start:start + 32], cfg.video))
                predictions.update({s.video_id: t for s, t in zip(plan["test"][start:start + 32], texts)})
        model.train()
        accuracy = synthetic.attribute_accuracy(predictions, truth)
        confusion = Counter()
        for video_id, text in predictions.items():
            objects = truth[video_id]["objects"]
            if len(objects) == 1:
                named = synthetic.parse_caption(text)["objects"]
                confusion[(objects[0]["motion"], named[0]["motion"] if named else None)] += 1
        figures = {k: round(accuracy[k], 3) for k in ("colour", "shape", "motion", "object", "video")}
        print(f"step {step}: {figures}", flush=True)
        for motion in synthetic.MOTIONS:
            named = {got: n for (true, got), n in confusion.items() if true == motion}
            print(f"    {motion:>6} named as {dict(sorted(named.items(), key=lambda kv: -kv[1]))}")
        return figures

    start, order = time.perf_counter(), []
    for step in range(steps):
        if len(order) < args.batch:
            order = rng.sample(range(args.videos), args.videos)
        batch = [order.pop() for _ in range(args.batch)]
        labels = tokenize_captions(bundle.tokenizer, [rng.choice(captions[i]) for i in batch])
        loss = model(pixel_values=to_pixel_values(train[batch], cfg.video), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if args.eval_every and step and step % args.eval_every == 0:
            evaluate(step)
    seconds = time.perf_counter() - start
    figures = evaluate(steps)
    print(f"RESULT {' '.join(sys.argv[1:]) or '(defaults)'}: {figures}, {seconds:.0f} s training")


if __name__ == "__main__":
    main()
