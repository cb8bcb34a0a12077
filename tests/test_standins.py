"""Stand-ins for the hub parts: the hub configs' shapes, GPT-2's tokenizer layout, loaded as `model.kind: pretrained`."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, GPT2Tokenizer

from stgpt.config import CONFIG_DIR, load_config
from stgpt.model import build_model
from stgpt.standins import main, write_standins

# The key fields of the hub configs (facebook/timesformer-base-finetuned-k600 and gpt2), written out here on purpose
# rather than imported from stgpt.standins, so a change there has to agree with the hub to pass.
HUB_ENCODER = {"model_type": "timesformer", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
               "intermediate_size": 3072, "patch_size": 16, "image_size": 224, "num_frames": 8,
               "attention_type": "divided_space_time", "hidden_act": "gelu", "layer_norm_eps": 1e-6,
               "qkv_bias": True, "architectures": ["TimesformerForVideoClassification"]}
HUB_DECODER = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
               "n_head": 12, "activation_function": "gelu_new", "bos_token_id": 50256, "eos_token_id": 50256,
               "layer_norm_epsilon": 1e-5, "architectures": ["GPT2LMHeadModel"]}


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return write_standins(tmp_path_factory.mktemp("standins"), encoder_layers=1, decoder_layers=1)


def test_standin_configs_are_the_hub_configs(standins):
    encoder = json.loads((standins.encoder / "config.json").read_text())
    decoder = json.loads((standins.decoder / "config.json").read_text())
    assert {k: encoder[k] for k in HUB_ENCODER} == {**HUB_ENCODER, "num_hidden_layers": 1}  # fewer layers asked
    assert {k: decoder[k] for k in HUB_DECODER} == {**HUB_DECODER, "n_layer": 1}
    assert len(encoder["id2label"]) == 600
    assert AutoConfig.from_pretrained(standins.encoder).num_labels == 600
    processor = json.loads((standins.encoder / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 224, "width": 224} and processor["size"] == {"shortest_edge": 224}


def test_standin_tokenizer_has_gpt2_layout_size_and_special_token(standins):
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in standins.decoder.iterdir()}
    vocab = json.loads((standins.decoder / "vocab.json").read_text())
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256 and sorted(vocab.values()) == list(range(50257))
    slow = GPT2Tokenizer(vocab=str(standins.decoder / "vocab.json"), merges=str(standins.decoder / "merges.txt"))
    text = "A person is putting a red ball into a box, then walks away."
    ids = slow(text)["input_ids"]
    assert ids == GPT2Tokenizer.from_pretrained(standins.decoder)(text)["input_ids"]  # the two file sets agree
    assert slow.decode(ids) == text and max(ids) < 50256  # real merges, no fillers, round trip


def test_standins_load_through_the_pretrained_path(standins):
    cfg = load_config(CONFIG_DIR / "vatex.yaml",
                      [f"model.encoder={standins.encoder}", f"model.decoder={standins.decoder}"])
    built = build_model(cfg)
    model = built.model
    assert model.config.encoder.hidden_size == 768 and model.config.decoder.n_embd == 768
    assert model.config.decoder.add_cross_attention and model.config.decoder_start_token_id == 50256
    assert model.config.pad_token_id == 50256 and len(built.tokenizer) == 50257
    # the encoder's weights are the stand-in's (the classifier head dropped), the cross-attention new
    from safetensors.torch import load_file

    weights = load_file(str(standins.encoder / "model.safetensors"))
    torch.testing.assert_close(model.encoder.embeddings.patch_embeddings.projection.weight,
                               weights["timesformer.embeddings.patch_embeddings.projection.weight"])
    assert hasattr(model.decoder.transformer.h[0], "crossattention")
    assert model.generation_config.num_beams == 8 and model.generation_config.min_new_tokens == 30


def test_cli_rejects_zero_layers(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--encoder-layers", "0"])
    assert exit_info.value.code == 2 and "at least 1" in capsys.readouterr().err
