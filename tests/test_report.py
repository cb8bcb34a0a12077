"""The demo's picture: captions drawn with a visible gap between words (Pillow's default space is 2 px wide)."""
import numpy as np
from PIL import Image

from stgpt.report import CaptionedVideo, caption_strip


def test_caption_picture_puts_a_visible_gap_between_words(tmp_path):
    text = "A green box becomes smaller."
    video = CaptionedVideo("v", np.zeros((2, 16, 16, 3), np.uint8), text, "x")
    path = caption_strip([video], tmp_path / "p.png", frame_size=16)
    image = np.asarray(Image.open(path).convert("L"))
    top = 16 + 8 + 16  # frames, margin, the video ID's line: then the generated caption's line
    ink = np.flatnonzero((image[top: top + 16] < 200).any(axis=0))
    gaps = np.diff(ink) - 1  # blank columns between inked ones, from the line's first ink to its last
    words = ("generated: " + text).split()
    assert (gaps >= 4).sum() == len(words) - 1, gaps  # one clear gap per space
