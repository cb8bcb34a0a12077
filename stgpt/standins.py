"""Local stand-ins for SpaceTimeGPT's two pretrained parts, for rehearsing the full-scale recipe offline.

    python -m stgpt.standins outputs/standins                       # real sizes (about 1 GB)
    python -m stgpt.standins outputs/standins-1l --encoder-layers 1 --decoder-layers 1
    python jobs/train.py --config configs/vatex.yaml model.encoder=outputs/standins/timesformer-base-finetuned-k600 \
        model.decoder=outputs/standins/gpt2 ...

Hub weights cannot be downloaded on the development machines, but their shapes can be built: random-init
checkpoints with the configurations of `facebook/timesformer-base-finetuned-k600` (a video classifier: 768 wide,
12 layers, 12 heads, patch 16, 224 px, 8 frames, divided space-time attention, 600 labels; its preprocessor
config is VideoMAE's) and `gpt2` (768 wide, 12 layers, 12 heads, 1024 positions, 50257 tokens), each written by
`save_pretrained` in the hub repository's layout, so `model.kind: pretrained` loads a folder exactly as it loads
the hub id. The decoder folder holds a byte-level BPE tokenizer in GPT-2's files (vocab.json, merges.txt,
tokenizer.json): trained on a little English with `tokenizers`, then padded with never-produced filler tokens to
50,256 entries plus `<|endoftext|>` at id 50256, so its ids, special token and size are GPT-2's. Label names
and captions are placeholders; only the shapes, and so the costs, are real.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, TimesformerConfig,
                          TimesformerForVideoClassification)

from stgpt.config import VideoConfig
from stgpt.model import SPECIAL_TOKEN
from stgpt.synthetic import plan_dataset
from stgpt.transforms import image_processor

ENCODER_HUB_ID = "facebook/timesformer-base-finetuned-k600"
DECODER_HUB_ID = "gpt2"
# The fields of the hub configs that fix the models' shapes and behaviour (the rest are transformers' defaults).
ENCODER_FIELDS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      patch_size=16, image_size=224, num_frames=8, num_channels=3,
                      attention_type="divided_space_time", hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0)
ENCODER_LABELS = 600  # Kinetics-600
DECODER_FIELDS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                      activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                      layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256)
TRAINED_VOCAB = 2000  # tokens learnt from the text below; the rest up to GPT-2's size are fillers


@dataclass
class StandIns:
    encoder: Path
    decoder: Path

    def overrides(self) -> list[str]:
        """The config overrides that make `configs/vatex.yaml` use these folders."""
        return ["model.kind=pretrained", f"model.encoder={self.encoder}", f"model.decoder={self.decoder}"]


def _corpus() -> list[str]:
    """Some English for the tokenizer: the synthetic dataset's captions and this project's documentation."""
    plans = plan_dataset({"train": 512}, seed=0)
    texts = [caption for spec in plans["train"] for caption in spec.captions]
    readme = Path(__file__).resolve().parent.parent / "README.md"
    if readme.exists():
        texts += [line for line in readme.read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts + [__doc__ or ""]


def gpt2_tokenizer(out_dir: str | Path, vocab_size: int = DECODER_FIELDS["vocab_size"]) -> GPT2Tokenizer:
    """A byte-level BPE tokenizer saved in GPT-2's layout with GPT-2's size and `<|endoftext|>` id (the last)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=TRAINED_VOCAB, min_frequency=2, show_progress=False)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for filler in range(len(vocab), vocab_size - 1):  # never produced: no merge builds them
        vocab[f"<|standin_{filler:05d}|>"] = filler
    vocab[SPECIAL_TOKEN] = vocab_size - 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.save_pretrained(out)  # tokenizer.json and tokenizer_config.json; the hub repo also has:
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return tokenizer


def write_standins(out_dir: str | Path, encoder_layers: int = 12, decoder_layers: int = 12,
                   seed: int = 0) -> StandIns:
    """Write the two stand-ins under `out_dir` (fewer layers on request, same widths); returns their folders."""
    out = Path(out_dir)
    encoder_dir, decoder_dir = out / ENCODER_HUB_ID.split("/")[-1], out / DECODER_HUB_ID
    torch.manual_seed(seed)
    labels = {i: f"kinetics600_class_{i:03d}" for i in range(ENCODER_LABELS)}
    encoder_config = TimesformerConfig(**{**ENCODER_FIELDS, "num_hidden_layers": encoder_layers},
                                       id2label=labels, label2id={v: k for k, v in labels.items()},
                                       architectures=["TimesformerForVideoClassification"])
    TimesformerForVideoClassification(encoder_config).save_pretrained(encoder_dir)
    image_processor(VideoConfig()).save_pretrained(encoder_dir)  # the hub repo's preprocessor: VideoMAE's

    tokenizer = gpt2_tokenizer(decoder_dir)
    decoder_config = GPT2Config(**{**DECODER_FIELDS, "n_layer": decoder_layers}, architectures=["GPT2LMHeadModel"])
    if len(tokenizer) != decoder_config.vocab_size or tokenizer.eos_token_id != decoder_config.eos_token_id:
        raise AssertionError(f"stand-in tokenizer has {len(tokenizer)} tokens, eos {tokenizer.eos_token_id}")
    GPT2LMHeadModel(decoder_config).save_pretrained(decoder_dir)
    return StandIns(encoder_dir, decoder_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="outputs/standins")
    parser.add_argument("--encoder-layers", type=int, default=ENCODER_FIELDS["num_hidden_layers"])
    parser.add_argument("--decoder-layers", type=int, default=DECODER_FIELDS["n_layer"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.encoder_layers < 1 or args.decoder_layers < 1:
        parser.error("--encoder-layers and --decoder-layers must be at least 1")
    made = write_standins(args.out_dir, args.encoder_layers, args.decoder_layers, args.seed)
    print(f"encoder: {made.encoder}\ndecoder: {made.decoder}\nuse with: {' '.join(made.overrides())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
