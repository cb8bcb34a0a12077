"""Run options for the TimeSformer encoder: fused attention, frame memory layout, torch.compile.

transformers' `TimesformerSelfAttention` computes attention as matmul, softmax, matmul, materialising every
(heads x tokens x tokens) score matrix. `attention: sdpa` swaps that module's forward, on each instance at build
time, for `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPUs, a fused
kernel on CPUs). Parameters and their names are untouched, so checkpoints are the same files either way, and
`eager` gives back transformers' own code. `channels_last` feeds the patch embedding's convolution frames laid out
(B, T, H, W, C) in memory, the layout decoded frames already have; `false` copies them to (B, T, C, H, W) first.
`compile` wraps the encoder in `torch.compile` in place (`nn.Module.compile`: state-dict keys unchanged).
bf16 is not an option here: it is the `precision` of training and serving (autocast). Measurements of each
option are in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers.models.timesformer.modeling_timesformer import TimesformerPatchEmbeddings, TimesformerSelfAttention

from stgpt.config import EncoderConfig

ATTENTIONS = ("sdpa", "eager")


def _sdpa_forward(self: TimesformerSelfAttention, hidden_states: torch.Tensor, output_attentions: bool = False):
    """TimesformerSelfAttention.forward with the fused kernel; same inputs, outputs and parameters."""
    if output_attentions:  # the fused kernel does not return the probabilities: use transformers' code
        return TimesformerSelfAttention.forward(self, hidden_states, output_attentions=True)
    batch_size, tokens, channels = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch_size, tokens, 3, self.num_heads, channels // self.num_heads)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    context = F.scaled_dot_product_attention(query, key, value, scale=self.scale,
                                             dropout_p=self.attn_drop.p if self.training else 0.0)
    return (context.transpose(1, 2).reshape(batch_size, tokens, channels),)


def set_attention(model: torch.nn.Module, kind: str) -> int:
    """Make every TimeSformer attention in `model` use `kind` ("sdpa" or "eager"); returns how many changed."""
    if kind not in ATTENTIONS:
        raise ValueError(f"encoder.attention must be one of {ATTENTIONS}, got {kind!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, TimesformerSelfAttention):
            if kind == "sdpa":
                module.forward = types.MethodType(_sdpa_forward, module)
            else:
                module.__dict__.pop("forward", None)  # back to the class's forward
            count += 1
    return count


def _frames_layout(channels_last: bool):
    def hook(module, args):
        (pixel_values,) = args  # (B, T, C, H, W)
        if channels_last:
            return (pixel_values.movedim(2, -1).contiguous().movedim(-1, 2),)
        return (pixel_values.contiguous(),)

    return hook


def apply_encoder_options(model: torch.nn.Module, options: EncoderConfig) -> torch.nn.Module:
    """Apply `options` (attention, frame layout, compile) to a SpaceTimeGPT's encoder, in place; returns `model`."""
    set_attention(model, options.attention)
    encoder = getattr(model, "encoder", model)
    for module in encoder.modules():
        if isinstance(module, TimesformerPatchEmbeddings):
            for handle in getattr(module, "_stgpt_layout_hooks", []):
                handle.remove()
            module._stgpt_layout_hooks = [module.register_forward_pre_hook(_frames_layout(options.channels_last))]
    if options.compile:
        encoder.compile(dynamic=False)
    return model
