"""The encoder's run options against the current path, at full size: TimeSformer-base forward + backward.

    python benchmarks/encoder_options.py                  # CPU, one sample, writes its RESULTS.md section
    python benchmarks/encoder_options.py --batch 6 --device cuda --no-write

Variants, measured in one run on the same input, interleaved round by round so a load change on a shared
machine hits them all: `eager` (transformers' attention, frames copied to (B, T, C, H, W): the path before
stgpt.encoder), `sdpa`, `sdpa + channels_last`, `sdpa + bf16 autocast`, `sdpa + torch.compile`. Each one's
output is checked against eager's (fp32 ones to 1e-4 relative here; tests/test_encoder.py checks 1e-5 on a small
model). Random-init weights of the hub shapes (stgpt.standins): speed does not depend on the values.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import machine_info, write_section  # noqa: E402
from stgpt.config import EncoderConfig  # noqa: E402
from stgpt.encoder import apply_encoder_options  # noqa: E402
from stgpt.standins import ENCODER_FIELDS  # noqa: E402

VARIANTS = {  # name -> (EncoderConfig, autocast dtype)
    "eager (before)": (EncoderConfig(attention="eager", channels_last=False), None),
    "sdpa": (EncoderConfig(attention="sdpa", channels_last=False), None),
    "sdpa + channels_last": (EncoderConfig(attention="sdpa", channels_last=True), None),
    "sdpa + bf16 autocast": (EncoderConfig(attention="sdpa", channels_last=True), torch.bfloat16),
    "sdpa + torch.compile": (EncoderConfig(attention="sdpa", channels_last=True, compile=True), None),
}


def full_size_encoder(layers: int = ENCODER_FIELDS["num_hidden_layers"]):
    from transformers import TimesformerConfig, TimesformerModel

    torch.manual_seed(0)
    return TimesformerModel(TimesformerConfig(**{**ENCODER_FIELDS, "num_hidden_layers": layers}))


def step(model, pixels: torch.Tensor, dtype, device: torch.device) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = model(pixel_values=pixels).last_hidden_state
    out.float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out.detach().float()


def measure(batch: int, device: torch.device, rounds: int, layers: int, names: list[str]) -> list[dict]:
    base = full_size_encoder(layers).to(device).train()
    frames = torch.randint(0, 256, (batch, 8, 224, 224, 3), dtype=torch.uint8, device=device)
    pixels = frames.movedim(-1, 2).float().div(255).sub(0.45).div(0.225)  # (B, T, C, H, W), laid out B T H W C
    models, first, times, outputs = {}, {}, {n: [] for n in names}, {}
    for name in names:
        options, dtype = VARIANTS[name]
        models[name] = apply_encoder_options(copy.deepcopy(base), options)
        start = time.perf_counter()
        outputs[name] = step(models[name], pixels, dtype, device)  # warm-up (and compilation)
        first[name] = time.perf_counter() - start
    for _ in range(rounds):
        for name in names:
            start = time.perf_counter()
            step(models[name], pixels, VARIANTS[name][1], device)
            times[name].append(time.perf_counter() - start)
    reference = outputs[names[0]]
    rows = []
    for name in names:
        diff = float((outputs[name] - reference).abs().max() / reference.abs().max())
        median = statistics.median(times[name])
        rows.append({"name": name, "seconds": median, "first": first[name], "rel_diff": diff,
                     "speedup": statistics.median(times[names[0]]) / median})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=ENCODER_FIELDS["num_hidden_layers"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = measure(args.batch, device, args.rounds, args.layers, args.variants)
    lines = [f"| variant | s per step (median of {args.rounds}) | vs eager | first step (s) | max rel. diff of output |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['name']} | {r['seconds']:.2f} | {r['speedup']:.2f}x | {r['first']:.1f} | {r['rel_diff']:.1e} |"
              for r in rows]
    print("\n".join(lines))
    if not args.no_write:
        write_section("encoder-options", "\n".join([
            "## Encoder run options: TimeSformer-base forward + backward (`python benchmarks/encoder_options.py`)",
            "",
            f"{args.layers} layers, 768 wide, 8 frames at 224 px, batch {args.batch}, on {device.type}; "
            f"{machine_info()}. The machine was shared with three other agents' work, so absolute times are "
            "loaded ones; the variants ran interleaved round by round, so the ratios are the figure to read.",
            "",
            *lines,
        ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
