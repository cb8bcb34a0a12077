"""Caption videos with a loaded model: the one code path offline evaluation, serving and the demo share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from stgpt.config import EncoderConfig
from stgpt.device import autocast, pick_device, resolve_precision
from stgpt.encoder import apply_encoder_options
from stgpt.model import CaptionModel, generate_captions, load_checkpoint
from stgpt.transforms import to_pixel_values
from stgpt.video import VideoSource, sample_video


@dataclass
class Caption:
    caption: str
    frame_indices: list[int]
    num_source_frames: int


class Captioner:
    """A model on a device, turning uint8 frames or whole videos into captions by beam search."""

    def __init__(self, caption_model: CaptionModel, use_gpu: bool = True, precision: str = "auto",
                 encoder: EncoderConfig | None = None):
        self.device = pick_device(use_gpu)
        self.precision = resolve_precision(precision, self.device)
        self.caption_model = caption_model
        self.model = apply_encoder_options(caption_model.model.to(self.device).eval(), encoder or EncoderConfig())
        self.video = caption_model.video
        self.name = caption_model.name

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, use_gpu: bool = True, precision: str = "auto",
                        encoder: EncoderConfig | None = None) -> "Captioner":
        return cls(load_checkpoint(name_or_path), use_gpu=use_gpu, precision=precision, encoder=encoder)

    def caption_frames(self, frames: np.ndarray | torch.Tensor | Sequence[np.ndarray], **generation) -> list[str]:
        """Captions for a batch of uint8 frames `(B, T, H, W, 3)`; `generation` overrides beam-search settings."""
        if isinstance(frames, (list, tuple)):
            frames = np.stack(frames)
        batch = torch.as_tensor(frames).to(self.device, non_blocking=True)
        pixel_values = to_pixel_values(batch, self.video)
        with autocast(self.device, self.precision):
            return generate_captions(self.caption_model, pixel_values, **generation)

    def caption_each(self, frames: np.ndarray, **generation) -> list[str | Exception]:
        """`caption_frames` for a batch in one beam search; if that fails, each video alone, so one bad input
        costs its own caption (an exception in its place) and not the batch's. For the batch jobs' actors."""
        try:
            return list(self.caption_frames(frames, **generation))
        except Exception:
            results: list[str | Exception] = []
            for one in frames:
                try:
                    results.append(self.caption_frames(one[None], **generation)[0])
                except Exception as exc:
                    results.append(exc)
            return results

    def caption_video(self, source: VideoSource, name: str | None = None, **generation) -> Caption:
        """Decode, sample and caption one video (a path or bytes)."""
        sampled = sample_video(source, self.video, name=name)
        text = self.caption_frames(sampled.frames[None], **generation)[0]
        return Caption(text, sampled.indices.tolist(), sampled.num_source_frames)
