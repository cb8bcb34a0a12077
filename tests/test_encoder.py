"""The encoder's run options: fused attention equals transformers' eager attention, checkpoints are unchanged."""
from __future__ import annotations

import pytest
import torch
from transformers import TimesformerConfig, TimesformerModel

from stgpt.config import ConfigError, EncoderConfig, load_config
from stgpt.encoder import apply_encoder_options, set_attention


def _encoder(dropout: float = 0.0) -> TimesformerModel:
    torch.manual_seed(0)
    return TimesformerModel(TimesformerConfig(
        image_size=32, patch_size=16, num_frames=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, attention_probs_dropout_prob=dropout))


def _run(model, pixels):
    model.zero_grad(set_to_none=True)
    pixels = pixels.clone().requires_grad_(True)
    out = model(pixel_values=pixels).last_hidden_state
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), pixels.grad, grads


@pytest.mark.parametrize("channels_last", [True, False])
def test_sdpa_equals_eager_outputs_and_gradients(channels_last):
    model = _encoder()
    pixels = torch.randn(2, 4, 3, 32, 32)
    assert set_attention(model, "eager") == 4  # 2 layers x (temporal + spatial)
    eager = _run(model, pixels)
    apply_encoder_options(model, EncoderConfig(attention="sdpa", channels_last=channels_last))
    assert all("forward" in m.__dict__ for m in model.modules() if type(m).__name__ == "TimesformerSelfAttention")
    fused = _run(model, pixels)
    torch.testing.assert_close(fused[0], eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1], eager[1], atol=1e-5, rtol=1e-5)
    assert fused[2].keys() == eager[2].keys()
    for name in eager[2]:
        # summed gradients (cls_token's over every frame reach |g| ~ 100): fp32 rounding scales with the sum
        scale = eager[2][name].abs().max().item()
        torch.testing.assert_close(fused[2][name], eager[2][name], atol=1e-5 + 1e-6 * scale, rtol=1e-5, msg=name)
    set_attention(model, "eager")  # and back: transformers' own forward again
    torch.testing.assert_close(_run(model, pixels)[0], eager[0], atol=0, rtol=0)


def test_sdpa_keeps_attention_probabilities_and_checkpoints(tmp_path):
    model = _encoder()
    keys = set(model.state_dict())
    set_attention(model, "sdpa")
    assert set(model.state_dict()) == keys
    out = model(pixel_values=torch.randn(1, 4, 3, 32, 32), output_attentions=True)
    assert out.attentions is not None and out.attentions[0].shape[-1] == out.attentions[0].shape[-2]
    model.save_pretrained(tmp_path)
    reloaded = TimesformerModel.from_pretrained(tmp_path)
    assert set(reloaded.state_dict()) == keys


def test_sdpa_applies_attention_dropout_only_in_training():
    model = _encoder(dropout=0.5)
    set_attention(model, "sdpa")
    pixels = torch.randn(1, 4, 3, 32, 32)
    model.eval()
    first = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state, first)
    model.train()
    assert not torch.equal(model(pixel_values=pixels).last_hidden_state, model(pixel_values=pixels).last_hidden_state)


def test_unknown_attention_is_rejected():
    with pytest.raises(ValueError, match="encoder.attention"):
        set_attention(_encoder(), "flash")
    with pytest.raises(ConfigError, match="encoder.attention"):  # before any job starts
        load_config(None, ["encoder.attention=flash"])
    assert load_config(None, ["encoder.attention=eager", "encoder.compile=true"]).encoder.compile is True
