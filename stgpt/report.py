"""A picture a person would look at: sampled frames in a strip, with generated and reference captions under them."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
GENERATED = (20, 90, 200)
REFERENCE = (40, 40, 40)


@dataclass
class CaptionedVideo:
    video_id: str
    frames: np.ndarray  # uint8 (T, H, W, 3)
    generated: str
    reference: str


def caption_strip(videos: Sequence[CaptionedVideo], path: str | Path, frame_size: int = 112) -> Path:
    """Write a PNG with one row per video: its frames left to right, then the two captions underneath."""
    if not videos:
        raise ValueError("caption_strip needs at least one video")
    font = ImageFont.load_default()
    columns = max(v.frames.shape[0] for v in videos)
    width = columns * (frame_size + 4) + 4
    chars_per_line = max(40, width // 7)
    rows = []
    for video in videos:
        lines = [(f"{video.video_id}", REFERENCE)]
        lines += [(line, GENERATED) for line in textwrap.wrap(f"generated: {video.generated}", chars_per_line)]
        lines += [(line, REFERENCE) for line in textwrap.wrap(f"reference: {video.reference}", chars_per_line)]
        rows.append((video, lines))
    line_height = 14
    heights = [frame_size + 8 + line_height * len(lines) + 10 for _, lines in rows]
    canvas = Image.new("RGB", (width, sum(heights)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    top = 0
    for (video, lines), height in zip(rows, heights):
        for i, frame in enumerate(video.frames):
            thumb = Image.fromarray(frame).resize((frame_size, frame_size), Image.Resampling.BILINEAR)
            canvas.paste(thumb, (4 + i * (frame_size + 4), top + 4))
        y = top + frame_size + 8
        for text, colour in lines:
            draw.text((6, y), text, fill=colour, font=font)
            y += line_height
        draw.line([(0, top + height - 2), (width, top + height - 2)], fill=(200, 200, 200))
        top += height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
