"""Frame preprocessing as `MCG-NJU/videomae-base` does it, vectorised in torch.

Resize the shortest edge to `short_side`, centre-crop `crop_size` square, rescale to [0, 1] and normalise with the
ImageNet mean and std. Frames stay uint8 (channels last, as decoded) through storage and data loading;
`normalize` turns them into float `pixel_values` `(B, T, 3, H, W)` on whatever device they are on, so that step
can run on the GPU inside the training or generation step.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from stgpt.config import VideoConfig
from stgpt.video import resized_shape  # one rule for the decoder's scaling and this resize

Frames = Union[np.ndarray, torch.Tensor]


def resize_and_crop(frames: Frames, short_side: int = 224, crop_size: int = 224) -> torch.Tensor:
    """Resize (bilinear, antialiased) then centre-crop uint8 frames `(..., H, W, 3)`; returns uint8, same layout."""
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (..., H, W, 3), got {tuple(x.shape)} {x.dtype}")
    lead, (height, width) = x.shape[:-3], x.shape[-3:-1]
    x = x.reshape(-1, height, width, 3).permute(0, 3, 1, 2)  # (N, 3, H, W)
    new_h, new_w = resized_shape(height, width, short_side)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x.float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    if crop_size > new_h or crop_size > new_w:
        raise ValueError(f"crop {crop_size} is larger than the resized frame {new_h}x{new_w}")
    top, left = (new_h - crop_size) // 2, (new_w - crop_size) // 2
    x = x[:, :, top:top + crop_size, left:left + crop_size]
    return x.permute(0, 2, 3, 1).reshape(*lead, crop_size, crop_size, 3).contiguous()


def normalize(
    frames: Frames,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 `(..., T, H, W, 3)` to normalised `(..., T, 3, H, W)` pixel values, on the frames' device."""
    x = torch.as_tensor(frames)
    mean_t = torch.tensor(mean, dtype=dtype, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=dtype, device=x.device).view(3, 1, 1)
    x = x.movedim(-1, -3).to(dtype).div_(255.0)
    return (x - mean_t) / std_t


def to_pixel_values(frames: Frames, cfg: VideoConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Everything the model needs from raw uint8 frames: resize/crop where needed, then normalise."""
    x = torch.as_tensor(frames)
    if x.shape[-3] != cfg.crop_size or x.shape[-2] != cfg.crop_size:
        x = resize_and_crop(x, cfg.short_side, cfg.crop_size)
    return normalize(x, cfg.image_mean, cfg.image_std, dtype=dtype)


def image_processor(cfg: VideoConfig):
    """The transformers image processor with the same settings, saved in checkpoints so other tools load them."""
    from transformers import VideoMAEImageProcessorPil

    return VideoMAEImageProcessorPil(
        size={"shortest_edge": cfg.short_side},
        crop_size={"height": cfg.crop_size, "width": cfg.crop_size},
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
    )


def video_config_from_processor(processor, num_frames: int = 8) -> VideoConfig:
    """Read the preprocessing settings back from a saved image processor (e.g. one found in a checkpoint)."""
    size = processor.size
    short = size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224))
    crop = processor.crop_size
    return VideoConfig(
        num_frames=num_frames,
        short_side=int(short),
        crop_size=int(crop.get("height", short)),
        image_mean=[float(v) for v in processor.image_mean],
        image_std=[float(v) for v in processor.image_std],
    )
