"""The full-size model on one GPU, in under five minutes: what each encoder option buys, and what fits.

    python benchmarks/gpu_check.py                      # on a GPU node: prints a table, writes gpu_check.json
    python benchmarks/gpu_check.py --smoke              # a tiny model on the CPU: proves the script runs

Training: SpaceTimeGPT at the hub sizes (stgpt.standins' configs, random init), AdamW steps at the recipe's
batch size (configs/vatex.yaml: 6 per GPU) with 20-token captions, for each option against the recipe's path
before stgpt.encoder (eager attention, fp16 with a grad scaler): samples/s, peak GPU memory and model FLOPs
utilisation (FLOPs per sample counted by torch's FlopCounterMode on a meta-device copy; the GPU's dense bf16
peak from the table below or --peak-tflops). Generation: captions/s at batch 16 with the recipe's 8 beams and
30 to 60 new tokens. An option that runs out of memory is recorded as such and the next one runs.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stgpt.config import EncoderConfig  # noqa: E402
from stgpt.encoder import apply_encoder_options  # noqa: E402
from stgpt.standins import DECODER_FIELDS, ENCODER_FIELDS  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's datasheets, by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "A10": 125.0,
               "L4": 121.0, "V100": 125.0, "T4": 65.0}
TRAIN_VARIANTS = {  # name -> (encoder options, autocast precision)
    "eager, fp16 (before)": (EncoderConfig(attention="eager", channels_last=False), "fp16"),
    "sdpa, fp16": (EncoderConfig(attention="sdpa", channels_last=False), "fp16"),
    "sdpa, bf16": (EncoderConfig(attention="sdpa", channels_last=False), "bf16"),
    "sdpa, bf16, channels_last": (EncoderConfig(attention="sdpa", channels_last=True), "bf16"),
    "sdpa, bf16, channels_last, compile": (EncoderConfig(attention="sdpa", channels_last=True, compile=True), "bf16"),
}
CAPTION_TOKENS = 20  # about a VATEX caption


def model_config(smoke: bool):
    from transformers import GPT2Config, TimesformerConfig, VisionEncoderDecoderConfig

    encoder, decoder = dict(ENCODER_FIELDS), dict(DECODER_FIELDS)
    if smoke:
        encoder.update(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                       image_size=32)
        decoder.update(n_embd=64, n_layer=1, n_head=2, vocab_size=512, bos_token_id=511, eos_token_id=511)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        TimesformerConfig(**encoder), GPT2Config(**decoder, add_cross_attention=True, is_decoder=True))
    config.pad_token_id = config.decoder_start_token_id = config.eos_token_id = decoder["eos_token_id"]
    return config


def flops_per_sample(config) -> float:
    """Forward + backward FLOPs of one training sample, counted on a meta-device copy (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import VisionEncoderDecoderModel

    size = config.encoder.image_size
    with torch.device("meta"):
        model = VisionEncoderDecoderModel(config)
        pixels = torch.randn(1, config.encoder.num_frames, 3, size, size)
        labels = torch.zeros(1, CAPTION_TOKENS, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(pixel_values=pixels, labels=labels).loss.backward()
    return float(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's, not the variant's


def train_variant(base, options: EncoderConfig, precision: str, batch: int, steps: int, warmup: int,
                  device: torch.device, vocab: int) -> dict:
    model = apply_encoder_options(copy.deepcopy(base).to(device).train(), options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    size = base.config.encoder.image_size
    frames = torch.randint(0, 256, (batch, base.config.encoder.num_frames, size, size, 3), dtype=torch.uint8,
                           device=device)
    pixels = frames.movedim(-1, 2).float().div(255).sub(0.45).div(0.225)
    labels = torch.randint(0, vocab - 1, (batch, CAPTION_TOKENS), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            first, start = time.perf_counter() - start, time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss = model(pixel_values=pixels, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"samples_per_s": batch * steps / seconds, "warmup_s": first, "peak_mb": _peak_mb(device)}


@torch.no_grad()
def generation(base, batch: int, beams: int, min_tokens: int, max_tokens: int, device: torch.device) -> dict:
    model = apply_encoder_options(copy.deepcopy(base).to(device).eval(), EncoderConfig())
    size = base.config.encoder.image_size
    pixels = torch.randn(batch, base.config.encoder.num_frames, 3, size, size, device=device)
    kwargs = dict(num_beams=beams, min_new_tokens=min_tokens, max_new_tokens=max_tokens, early_stopping=True,
                  do_sample=False, pad_token_id=base.config.pad_token_id, eos_token_id=base.config.eos_token_id,
                  decoder_start_token_id=base.config.decoder_start_token_id)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        model.generate(pixel_values=pixels[:1], **kwargs)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        model.generate(pixel_values=pixels, **kwargs)
        _sync(device)
    seconds = time.perf_counter() - start
    return {"captions_per_s": batch / seconds, "seconds": seconds, "peak_mb": _peak_mb(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few steps: the script runs")
    parser.add_argument("--batch", type=int, default=6, help="training batch (configs/vatex.yaml: 6 per GPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: from the table)")
    parser.add_argument("--variants", nargs="+", choices=list(TRAIN_VARIANTS), default=list(TRAIN_VARIANTS))
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.batch, args.steps, args.warmup, args.gen_batch = 2, 2, 1, 2
        args.variants = [v for v in args.variants if "compile" not in v]  # compiling on a CPU takes minutes
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    config = model_config(args.smoke)
    flops = flops_per_sample(config)

    from transformers import VisionEncoderDecoderModel

    torch.manual_seed(0)
    base = VisionEncoderDecoderModel(config)
    report = {"device": name, "peak_tflops": peak, "train_flops_per_sample": flops, "batch": args.batch,
              "params_m": sum(p.numel() for p in base.parameters()) / 1e6, "train": {}, "smoke": args.smoke}
    print(f"{name}: {report['params_m']:.0f}M parameters, {flops / 1e12:.3f} TFLOP per training sample")
    for variant in args.variants:
        options, precision = TRAIN_VARIANTS[variant]
        try:
            row = train_variant(base, options, precision, args.batch, args.steps, args.warmup, device,
                                config.decoder.vocab_size)
            row["mfu"] = flops * row["samples_per_s"] / (peak * 1e12) if peak else None
        except torch.OutOfMemoryError:
            row = {"error": f"out of memory at batch {args.batch}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["train"][variant] = row
        print(f"train {variant}: {json.dumps(row)}", flush=True)
    beams, low, high = (2, 2, 4) if args.smoke else (8, 30, 60)
    report["generate"] = {"batch": args.gen_batch, "beams": beams, "new_tokens": [low, high],
                          **generation(base, args.gen_batch, beams, low, high, device)}
    print(f"generate: {json.dumps(report['generate'])}")
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
