"""A picture a person would look at: sampled frames in a strip, with generated and reference captions under them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
GENERATED = (20, 90, 200)
REFERENCE = (40, 40, 40)
FONT_SIZE = 12
LINE_HEIGHT = 16


def load_font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans where the system has it, else Pillow's built-in font (whose space is 2 px wide at this size,
    which is why `draw_words` spaces words itself)."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def space_width(font) -> int:
    """The gap between two words: a third of the font's height, at least 4 px, whatever the font's own space."""
    return max(4, round(font.getbbox("Hg")[3] / 3))


def wrap_words(text: str, font, max_width: int) -> list[list[str]]:
    """`text` as lines of words that fit `max_width` pixels when drawn by `draw_words` (a longer word alone)."""
    lines: list[list[str]] = []
    width = 0.0
    for word in text.split():
        advance = font.getlength(word)
        if lines and width + space_width(font) + advance <= max_width:
            lines[-1].append(word)
            width += space_width(font) + advance
        else:
            lines.append([word])
            width = advance
    return lines


def draw_words(draw: ImageDraw.ImageDraw, xy: tuple[int, int], words: Sequence[str], font, fill) -> None:
    """Draw words left to right with `space_width` between them."""
    x, y = xy
    for word in words:
        draw.text((x, y), word, fill=fill, font=font)
        x += font.getlength(word) + space_width(font)


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
    font = load_font()
    columns = max(v.frames.shape[0] for v in videos)
    width = max(columns * (frame_size + 4) + 4, 360)
    rows = []
    for video in videos:
        lines = [([video.video_id], REFERENCE)]
        lines += [(line, GENERATED) for line in wrap_words(f"generated: {video.generated}", font, width - 12)]
        lines += [(line, REFERENCE) for line in wrap_words(f"reference: {video.reference}", font, width - 12)]
        rows.append((video, lines))
    line_height = LINE_HEIGHT
    heights = [frame_size + 8 + line_height * len(lines) + 10 for _, lines in rows]
    canvas = Image.new("RGB", (width, sum(heights)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    top = 0
    for (video, lines), height in zip(rows, heights):
        for i, frame in enumerate(video.frames):
            thumb = Image.fromarray(frame).resize((frame_size, frame_size), Image.Resampling.BILINEAR)
            canvas.paste(thumb, (4 + i * (frame_size + 4), top + 4))
        y = top + frame_size + 8
        for words, colour in lines:
            draw_words(draw, (6, y), words, font, colour)
            y += line_height
        draw.line([(0, top + height - 2), (width, top + height - 2)], fill=(200, 200, 200))
        top += height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
