"""Device and mixed-precision choices, so every job runs the same code on a laptop CPU or a GPU cluster."""
from __future__ import annotations

import contextlib
import functools

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(use_gpu: bool = True) -> torch.device:
    """The GPU Ray (or CUDA_VISIBLE_DEVICES) gave this process if asked and present, else the CPU."""
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16, from the kernel's CPU flags; False where
    they cannot be read). Without it bf16 is emulated: a step of the tiny captioner took 6.5x its fp32 time on an
    AVX2 CPU, where AMX trained it 1.5x faster (benchmarks/RESULTS.md)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = {word for line in info if line.startswith("flags") for word in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` means bf16 on GPUs that support it, fp16 on older GPUs; on the CPU, bf16 where it multiplies bf16 in
    hardware (`cpu_has_bf16_matmul`) and fp32 elsewhere. An explicit bf16 is kept on any CPU; fp16 there means
    fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type != "cuda":
        if precision == "auto":
            return "bf16" if cpu_has_bf16_matmul() else "fp32"
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
