"""SpaceTimeGPT: a TimeSformer encoder and a GPT-2 decoder joined by cross-attention.

Three ways to get one, all returning the same `transformers.VisionEncoderDecoderModel`:
- `build_pretrained`: a pretrained encoder and decoder (hub ids or local paths), wired as the original training
  did (pad = eos, decoder start = bos, cross-attention added to the decoder);
- `load_checkpoint`: a fine-tuned checkpoint directory or hub id (e.g. `Neleac/timesformer-gpt2-video-captioning`);
- `build_tiny`: random-init, a few layers wide, for CPU tests and demos, with a byte-level BPE tokenizer trained on
  the dataset's own captions (`train_tokenizer`), since GPT-2's cannot be downloaded offline.

A checkpoint directory is self-contained and written with `save_pretrained` only: model weights and config,
generation config, tokenizer and the image processor settings, so `from_pretrained` of each part loads it without
stgpt.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    GPT2Config,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    TimesformerConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)
from transformers import (
    GenerationConfig as HFGenerationConfig,
)

from stgpt.config import Config, GenerationConfig, ModelConfig, VideoConfig
from stgpt.transforms import image_processor, video_config_from_processor

SPECIAL_TOKEN = "<|endoftext|>"  # GPT-2's single special token: bos, eos and (here) pad


@dataclass
class CaptionModel:
    """A model with everything needed to caption: its tokenizer and its preprocessing settings."""

    model: VisionEncoderDecoderModel
    tokenizer: PreTrainedTokenizerBase
    video: VideoConfig
    name: str = "model"


def train_tokenizer(captions: Iterable[str], vocab_size: int = 512, out_dir: str | Path | None = None,
                    ) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on `captions`; saved to `out_dir` if given."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(captions), vocab_size=vocab_size, min_frequency=1,
                            special_tokens=[SPECIAL_TOKEN], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN, unk_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """GPT-2's tokenizer (or any saved one), with pad set to eos as the original training did."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_pretrained(model_cfg: ModelConfig, video_cfg: VideoConfig) -> CaptionModel:
    """Pretrained TimeSformer + GPT-2 with fresh cross-attention: the starting point of fine-tuning."""
    # Mark the decoder config ourselves: transformers 5 configs loaded from disk may lack `is_decoder`, which
    # from_encoder_decoder_pretrained reads before setting it.
    decoder_config = AutoConfig.from_pretrained(model_cfg.decoder)
    decoder_config.is_decoder = True
    decoder_config.add_cross_attention = True
    model = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(
        model_cfg.encoder, model_cfg.decoder, decoder_config=decoder_config)
    tokenizer = load_tokenizer(model_cfg.tokenizer or model_cfg.decoder)
    _wire_special_tokens(model, tokenizer)
    return CaptionModel(model, tokenizer, video_cfg, name=f"{model_cfg.encoder}+{model_cfg.decoder}")


def build_tiny(model_cfg: ModelConfig, video_cfg: VideoConfig, tokenizer: PreTrainedTokenizerBase) -> CaptionModel:
    """A random-init SpaceTimeGPT of the same architecture, small enough to train on a CPU."""
    encoder = TimesformerConfig(
        image_size=video_cfg.crop_size, patch_size=model_cfg.patch_size, num_frames=video_cfg.num_frames,
        hidden_size=model_cfg.hidden_size, num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads, intermediate_size=4 * model_cfg.hidden_size,
        initializer_range=model_cfg.initializer_range,
    )
    decoder = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=model_cfg.hidden_size, n_layer=model_cfg.num_layers,
        n_head=model_cfg.num_heads, add_cross_attention=True, is_decoder=True,
        resid_pdrop=model_cfg.dropout, embd_pdrop=model_cfg.dropout, attn_pdrop=model_cfg.dropout,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        initializer_range=model_cfg.initializer_range,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    model = VisionEncoderDecoderModel(config=config)
    _wire_special_tokens(model, tokenizer)
    return CaptionModel(model, tokenizer, video_cfg, name="tiny")


def checkpoint_video(name_or_path: str | Path, num_frames: int | None = None) -> VideoConfig:
    """A checkpoint's preprocessing settings (frames, sizes, mean/std), read from its configs alone."""
    name = str(name_or_path)
    frames = num_frames or int(getattr(AutoConfig.from_pretrained(name).encoder, "num_frames", 8))
    try:
        return video_config_from_processor(AutoImageProcessor.from_pretrained(name), num_frames=frames)
    except (OSError, ValueError):  # no preprocessor_config.json: the original used videomae-base's settings
        return VideoConfig(num_frames=frames)


def decode_settings(checkpoint: str | Path, video: VideoConfig) -> VideoConfig:
    """What a decode stage feeding `checkpoint` must produce: its frame count, sizes and mean/std, with the
    limits and decoder of `video` (the job's)."""
    saved = checkpoint_video(checkpoint)
    return dataclasses.replace(video, num_frames=saved.num_frames, short_side=saved.short_side,
                               crop_size=saved.crop_size, image_mean=saved.image_mean, image_std=saved.image_std)


def load_checkpoint(name_or_path: str | Path, num_frames: int | None = None) -> CaptionModel:
    """A fine-tuned checkpoint (local directory or hub id) with its tokenizer and preprocessing settings."""
    name = str(name_or_path)
    model = VisionEncoderDecoderModel.from_pretrained(name)
    tokenizer = load_tokenizer(name)
    video = checkpoint_video(name, num_frames or int(getattr(model.config.encoder, "num_frames", 8)))
    _wire_special_tokens(model, tokenizer)
    return CaptionModel(model, tokenizer, video, name=name)


def build_model(cfg: Config, captions: Sequence[str] | None = None) -> CaptionModel:
    """The model a config asks for; `captions` train the tiny model's tokenizer."""
    kind = cfg.model.kind
    if kind == "pretrained":
        built = build_pretrained(cfg.model, cfg.video)
    elif kind == "checkpoint":
        if not cfg.model.checkpoint:
            raise ValueError("model.kind=checkpoint needs model.checkpoint (a directory or hub id)")
        built = load_checkpoint(cfg.model.checkpoint, num_frames=cfg.video.num_frames)
    elif kind == "tiny":
        if cfg.model.tokenizer:
            tokenizer = load_tokenizer(cfg.model.tokenizer)
        elif captions:
            tokenizer = train_tokenizer(captions, cfg.model.vocab_size)
        else:
            raise ValueError("model.kind=tiny needs captions to train a tokenizer on, or model.tokenizer")
        built = build_tiny(cfg.model, cfg.video, tokenizer)
    else:
        raise ValueError(f"model.kind must be pretrained, checkpoint or tiny, got {kind!r}")
    built.model.generation_config = generation_config(cfg.generation, built.tokenizer)
    return built


def generation_config(gen: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> HFGenerationConfig:
    """Beam-search settings as a transformers GenerationConfig (saved with checkpoints)."""
    return HFGenerationConfig(
        **gen.generate_kwargs(), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.bos_token_id,
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (Ray's `prepare_model` wraps it only with more than one
    worker), or the model itself."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(caption_model: CaptionModel, out_dir: str | Path) -> Path:
    """Write a self-contained Hugging Face checkpoint: model, generation config, tokenizer, image processor."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unwrap(caption_model.model).save_pretrained(out)
    caption_model.tokenizer.save_pretrained(out)
    image_processor(caption_model.video).save_pretrained(out)
    return out


def tokenize_captions(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], max_length: int = 64,
                      ) -> torch.Tensor:
    """Training labels: caption tokens then eos, padded with -100 so padding adds no loss."""
    ids = tokenizer(list(captions), add_special_tokens=False, truncation=True, max_length=max_length - 1)["input_ids"]
    width = max(len(x) for x in ids) + 1
    labels = torch.full((len(ids), width), -100, dtype=torch.long)
    for row, tokens in enumerate(ids):
        labels[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        labels[row, len(tokens)] = tokenizer.eos_token_id
    return labels


@torch.no_grad()
def generate_captions(caption_model: CaptionModel, pixel_values: torch.Tensor, **overrides) -> list[str]:
    """Beam-search captions for a batch of normalised pixel values `(B, T, 3, H, W)`."""
    model = caption_model.model
    output = model.generate(pixel_values=pixel_values.to(model.device, model.dtype), **overrides)
    texts = caption_model.tokenizer.batch_decode(output, skip_special_tokens=True)
    return [t.strip() for t in texts]


def _wire_special_tokens(model: VisionEncoderDecoderModel, tokenizer: PreTrainedTokenizerBase) -> None:
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.decoder_start_token_id = tokenizer.bos_token_id
    model.config.decoder.pad_token_id = tokenizer.pad_token_id
    model.config.decoder.bos_token_id = tokenizer.bos_token_id
    model.config.decoder.eos_token_id = tokenizer.eos_token_id
