"""One training step of the tiny default captioner: fp32 against bf16 autocast, and a learning encoder against a
still one (`train.encoder_freeze_ratio`), on this CPU.

    python benchmarks/caption_step.py              # writes its RESULTS.md section
    python benchmarks/caption_step.py --no-write --rounds 5

The step is `stgpt.training.forward` then backward, on configs/tiny.yaml's captioner (random-init weights of its
sizes: speed does not depend on the values), a worker's batch (`train.batch_size`) of 8-frame clips, one thread
(`train.cpus_per_worker`). The variants run interleaved round by round, so a load change hits them all; the ratios
are the figures to read. Whether `train.precision: auto` picks bf16 here is `stgpt.device.cpu_has_bf16_matmul`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import machine_info, write_section  # noqa: E402
from stgpt.config import CONFIG_DIR, load_config  # noqa: E402
from stgpt.device import autocast, cpu_has_bf16_matmul  # noqa: E402
from stgpt.model import build_model, tokenize_captions  # noqa: E402
from stgpt.shard_data import Batch  # noqa: E402
from stgpt.synthetic import plan_dataset  # noqa: E402
from stgpt.training import forward  # noqa: E402

VARIANTS = {"fp32": ("fp32", False), "fp32, encoder still": ("fp32", True), "bf16": ("bf16", False),
            "bf16, encoder still": ("bf16", True)}  # name -> (precision, still encoder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["model.kind=tiny"])
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(0)
    specs = plan_dataset({"train": 64}, seed=0)["train"]
    bundle = build_model(cfg, captions=[c for s in specs for c in s.captions])
    model, size, device = bundle.model.train(), cfg.train.batch_size, torch.device("cpu")
    labels = tokenize_captions(bundle.tokenizer, [s.captions[0] for s in specs[:size]])
    frames = torch.randint(0, 256, (size, cfg.video.num_frames, cfg.video.crop_size, cfg.video.crop_size, 3),
                           dtype=torch.uint8)
    batch = Batch(frames, labels, (labels != -100).long(), [s.video_id for s in specs[:size]], [[]] * size, size, [])

    def run(name: str, steps: int) -> float:
        precision, still = VARIANTS[name]
        start = time.perf_counter()
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = forward(model, batch, cfg.video, device, still_encoder=still)
            loss.backward()
        return (time.perf_counter() - start) / steps

    for name in VARIANTS:
        run(name, 2)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            times[name].append(run(name, args.steps))
    base = statistics.median(times["fp32"])
    lines = [f"| variant | ms per step (median of {args.rounds} rounds of {args.steps}) | time vs fp32 |",
             "| --- | ---: | ---: |"]
    lines += [f"| {name} | {1000 * statistics.median(t):.0f} | {statistics.median(t) / base:.2f}x |"
              for name, t in times.items()]
    native = cpu_has_bf16_matmul()
    print("\n".join(lines))
    print(f"bf16 matmul in hardware: {native} (train.precision=auto picks {'bf16' if native else 'fp32'})")
    if not args.no_write:
        write_section("caption-step", "\n".join([
            "## A training step of the tiny captioner: precision and a still encoder "
            "(`python benchmarks/caption_step.py`)",
            "",
            f"configs/tiny.yaml's captioner, a worker's batch of {size} clips of {cfg.video.num_frames} frames at "
            f"{cfg.video.crop_size} px, forward (`stgpt.training.forward`) and backward, one thread; {machine_info()}. "
            f"bf16 matmul in hardware (AMX or AVX512-BF16): **{'yes' if native else 'no'}**, so "
            f"`train.precision: auto` trains in {'bf16' if native else 'fp32'} here.",
            "",
            *lines,
        ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
