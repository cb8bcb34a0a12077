"""Our torch preprocessing against transformers' own VideoMAE image processor."""
import numpy as np
import pytest
import torch

from stgpt.config import IMAGENET_MEAN, IMAGENET_STD, VideoConfig
from stgpt.transforms import image_processor, normalize, resize_and_crop, resized_shape, to_pixel_values
from stgpt.video import read_video


def reference_pixel_values(frames: np.ndarray, cfg: VideoConfig) -> torch.Tensor:
    from transformers import VideoMAEImageProcessorPil

    # MCG-NJU/videomae-base's preprocessor_config.json: ImageNet mean/std (the class defaults are 0.5/0.5)
    processor = VideoMAEImageProcessorPil(
        size={"shortest_edge": cfg.short_side}, crop_size={"height": cfg.crop_size, "width": cfg.crop_size},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    return processor(list(frames), return_tensors="pt")["pixel_values"][0]


def smooth_frames(rng, t, h, w):
    """Natural-image-like frames: low-frequency colour fields plus a little noise."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    frames = []
    for _ in range(t):
        a, b, c = rng.uniform(0, 6, 3)
        img = np.stack([np.sin(a * x + b * y + c), np.cos(b * x - a * y), np.sin(c * x * y + a)], -1)
        img = (img + 1) * 110 + rng.normal(0, 8, img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


@pytest.mark.parametrize("h, w", [(360, 640), (480, 360), (224, 224), (120, 160)])
def test_matches_videomae_processor(h, w):
    cfg = VideoConfig()  # videomae-base: shortest edge 224, crop 224, ImageNet mean/std
    frames = smooth_frames(np.random.default_rng(h + w), 8, h, w)
    ours = to_pixel_values(frames, cfg)
    ref = reference_pixel_values(frames, cfg)
    assert ours.shape == ref.shape == (8, 3, 224, 224)
    assert (ours - ref).abs().mean().item() < 0.02


def test_matches_videomae_processor_on_decoded_video(make_video):
    frames = read_video(make_video(num_frames=16, width=320, height=240)).frames
    ours, ref = to_pixel_values(frames, VideoConfig()), reference_pixel_values(frames, VideoConfig())
    assert (ours - ref).abs().mean().item() < 0.02


def test_custom_sizes_and_batches():
    cfg = VideoConfig(short_side=96, crop_size=80)
    frames = np.random.default_rng(0).integers(0, 256, (2, 8, 120, 160, 3), dtype=np.uint8)
    cropped = resize_and_crop(frames, 96, 80)
    assert cropped.shape == (2, 8, 80, 80, 3) and cropped.dtype == torch.uint8
    pixel_values = to_pixel_values(frames, cfg)
    assert pixel_values.shape == (2, 8, 3, 80, 80)
    # batch and single video give the same result
    assert torch.allclose(pixel_values[1], to_pixel_values(frames[1], cfg))


def test_resized_shape_truncates_like_transformers():
    assert resized_shape(360, 640, 224) == (224, 398)
    assert resized_shape(640, 360, 224) == (398, 224)


def test_normalize_uses_mean_and_std():
    frames = torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)
    out = normalize(frames, [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    assert out.shape == (1, 3, 2, 2)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_rejects_float_frames_and_oversized_crops():
    with pytest.raises(ValueError, match="uint8"):
        resize_and_crop(np.zeros((8, 32, 32, 3), np.float32), 32, 32)
    with pytest.raises(ValueError, match="crop"):
        resize_and_crop(np.zeros((8, 32, 32, 3), np.uint8), 32, 64)


def test_processor_round_trip(tmp_path):
    from transformers import AutoImageProcessor

    from stgpt.transforms import video_config_from_processor

    cfg = VideoConfig(num_frames=4, short_side=96, crop_size=80)
    image_processor(cfg).save_pretrained(tmp_path)
    assert video_config_from_processor(AutoImageProcessor.from_pretrained(tmp_path), num_frames=4) == cfg
