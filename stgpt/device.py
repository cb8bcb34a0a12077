"""Device and mixed-precision choices, so every job runs the same code on a laptop CPU or a GPU cluster."""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(use_gpu: bool = True) -> torch.device:
    """The GPU Ray (or CUDA_VISIBLE_DEVICES) gave this process if asked and present, else the CPU."""
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` means bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU. On the CPU only an
    explicit bf16 is kept (autocast to bf16 matmuls trains the tiny model 1.5x faster on a CPU with AMX;
    benchmarks/RESULTS.md); fp16 there means fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type != "cuda":
        return "bf16" if precision == "bf16" else "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """An autocast context for the resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
