"""The model factory: tiny, pretrained parts from local paths, and self-contained checkpoints."""
import numpy as np
import pytest
import torch
from transformers import (AutoImageProcessor, AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel,
                          TimesformerConfig, TimesformerModel, VisionEncoderDecoderModel)

from stgpt.config import load_config
from stgpt.device import autocast, resolve_precision
from stgpt.inference import Captioner
from stgpt.model import (build_model, generate_captions, load_checkpoint, save_checkpoint, tokenize_captions,
                         train_tokenizer)
from stgpt.transforms import to_pixel_values

CAPTIONS = [f"a {c} {s} moves {m}" for c in ("red", "green", "blue") for s in ("circle", "square")
            for m in ("left", "right", "up", "down")] * 3


def tiny_config(**extra):
    overrides = ["model.kind=tiny", "video.short_side=32", "video.crop_size=32", "model.patch_size=16",
                 "model.hidden_size=32", "generation.min_new_tokens=2", "generation.max_new_tokens=8"]
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(tiny_config(), CAPTIONS)


def random_frames(batch=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, 8, 40, 48, 3), dtype=np.uint8)


def test_tokenizer_round_trip(tmp_path):
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=300, out_dir=tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded("a blue square moves up")["input_ids"]
    assert loaded.decode(ids) == "a blue square moves up"
    assert loaded.eos_token == loaded.bos_token == loaded.pad_token == "<|endoftext|>"
    assert len(loaded) == len(tokenizer) <= 300


def test_labels_end_with_eos_and_ignore_padding(tiny):
    labels = tokenize_captions(tiny.tokenizer, ["a red circle moves left", "a red circle"])
    eos = tiny.tokenizer.eos_token_id
    lengths = (labels != -100).sum(1)
    assert labels[0, lengths[0] - 1] == eos and labels[1, lengths[1] - 1] == eos
    assert lengths[1] < lengths[0] and (labels[1, lengths[1]:] == -100).all()


def test_special_tokens_wired_as_the_original(tiny):
    config, tokenizer = tiny.model.config, tiny.tokenizer
    assert config.pad_token_id == tokenizer.eos_token_id
    assert config.decoder_start_token_id == tokenizer.bos_token_id
    assert config.decoder.add_cross_attention


def test_forward_backward_and_eight_beam_generation(tiny):
    model = tiny.model
    pixel_values = to_pixel_values(random_frames(), tiny.video)
    labels = tokenize_captions(tiny.tokenizer, CAPTIONS[:2])
    out = model(pixel_values=pixel_values, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()
    model.eval()
    assert model.generation_config.num_beams == 8
    captions = generate_captions(tiny, pixel_values)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    bundle = build_model(tiny_config(), CAPTIONS)
    pixel_values = to_pixel_values(random_frames(4, seed=1), bundle.video)
    labels = tokenize_captions(bundle.tokenizer, CAPTIONS[:4])
    optimizer = torch.optim.AdamW(bundle.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = bundle.model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_tiny_dropout_is_configurable(tiny):
    assert tiny.model.config.decoder.resid_pdrop == 0.1  # GPT-2's default unless the config says otherwise
    bare = build_model(tiny_config(**{"model.dropout": 0.0}), CAPTIONS).model.train()
    pixel_values = to_pixel_values(random_frames(2), tiny.video)
    labels = tokenize_captions(tiny.tokenizer, CAPTIONS[:2])
    # no dropout: two training-mode passes agree; with GPT-2's default they do not
    first, second = (bare(pixel_values=pixel_values, labels=labels).loss for _ in range(2))
    assert torch.equal(first, second)
    was_training = tiny.model.training
    noisy = tiny.model.train()
    try:
        assert not torch.equal(noisy(pixel_values=pixel_values, labels=labels).loss,
                               noisy(pixel_values=pixel_values, labels=labels).loss)
    finally:
        noisy.train(was_training)


def test_init_std_is_configurable_and_reaches_both_parts():
    """model.initializer_range sets the std the random weights are drawn with, in the encoder and the decoder."""
    def weight_std(cfg_overrides: dict) -> tuple[float, float]:
        model = build_model(tiny_config(**cfg_overrides), CAPTIONS).model
        encoder = model.encoder.encoder.layer[0].intermediate.dense.weight
        decoder = model.decoder.transformer.h[0].mlp.c_fc.weight
        return encoder.std().item(), decoder.std().item()

    default = weight_std({})
    wide = weight_std({"model.initializer_range": 0.14})
    assert default == pytest.approx((0.02, 0.02), rel=0.15)
    assert wide == pytest.approx((0.14, 0.14), rel=0.15)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_the_cpu_when_asked_or_when_auto_finds_it_in_hardware(monkeypatch, native):
    from stgpt import device

    monkeypatch.setattr(device, "cpu_has_bf16_matmul", lambda: native)
    cpu = torch.device("cpu")
    auto = "bf16" if native else "fp32"
    assert [resolve_precision(p, cpu) for p in ("auto", "fp32", "fp16", "bf16")] == [auto, "fp32", "fp32", "bf16"]
    with autocast(cpu, "bf16"):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", cpu)


def test_checkpoint_is_self_contained(tiny, tmp_path):
    save_checkpoint(tiny, tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"
    # every part loads with plain transformers, no stgpt code
    model = VisionEncoderDecoderModel.from_pretrained(ckpt).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    processor = AutoImageProcessor.from_pretrained(ckpt)
    generation = GenerationConfig.from_pretrained(ckpt)
    assert generation.num_beams == 8 and generation.max_new_tokens == 8
    assert processor.crop_size["height"] == 32
    frames = random_frames(1)
    pixel_values = to_pixel_values(frames, tiny.video)
    tiny.model.eval()
    with torch.no_grad():
        expected = tiny.model.generate(pixel_values=pixel_values)
        got = model.generate(pixel_values=pixel_values)
    assert torch.equal(expected, got)
    # and stgpt's loader recovers the preprocessing settings
    loaded = load_checkpoint(ckpt)
    assert loaded.video == tiny.video
    assert Captioner(loaded, use_gpu=False).caption_frames(frames) == [tokenizer.decode(got[0], skip_special_tokens=True).strip()]


def test_pretrained_parts_from_local_paths(tmp_path):
    """Build from an encoder and decoder saved locally, as from hub ids: cross-attention added, pad = eos."""
    encoder_dir, decoder_dir = tmp_path / "timesformer", tmp_path / "gpt2"
    TimesformerModel(TimesformerConfig(image_size=32, patch_size=16, num_frames=8, hidden_size=32,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64)).save_pretrained(encoder_dir)
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=300, out_dir=decoder_dir)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               )).save_pretrained(decoder_dir)
    cfg = load_config(None, [f"model.encoder={encoder_dir}", f"model.decoder={decoder_dir}", "video.crop_size=32",
                             "video.short_side=32", "generation.min_new_tokens=1", "generation.max_new_tokens=4"])
    bundle = build_model(cfg)
    assert bundle.model.config.decoder.add_cross_attention
    assert bundle.model.config.pad_token_id == bundle.tokenizer.eos_token_id
    assert len(generate_captions(bundle, to_pixel_values(random_frames(1), cfg.video))) == 1


def test_bad_model_configs():
    with pytest.raises(ValueError, match="model.checkpoint"):
        build_model(load_config(None, ["model.kind=checkpoint"]))
    with pytest.raises(ValueError, match="captions"):
        build_model(load_config(None, ["model.kind=tiny"]))
    with pytest.raises(ValueError, match="model.kind"):
        build_model(load_config(None, ["model.kind=huge"]))
    with pytest.raises(OSError):
        load_checkpoint("/nonexistent/checkpoint")
