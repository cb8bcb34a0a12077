"""The main job on its embedded default: no flags, no downloads.

Makes a small synthetic dataset of moving shapes, builds a tiny random-init SpaceTimeGPT with a tokenizer trained
on the dataset's captions, and captions a few test videos by 8-beam search. (The full pipeline demo, with Ray
preprocessing, training, evaluation and serving, grows here as those jobs land.)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stgpt.annotations import load_annotations
from stgpt.config import CONFIG_DIR, load_config
from stgpt.inference import Captioner
from stgpt.model import build_model
from stgpt.synthetic import make_synthetic_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG_DIR / "tiny.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. generation.num_beams=4")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)

    data = cfg.data
    dataset = make_synthetic_dataset(data.root, {"train": data.synthetic_train, "validation": data.synthetic_validation,
                                                 "test": data.synthetic_test}, seed=data.synthetic_seed)
    train = load_annotations(dataset.annotation_paths["train"])
    bundle = build_model(cfg, [c for a in train for c in a.captions])
    captioner = Captioner(bundle, use_gpu=cfg.train.use_gpu)
    print(f"dataset: {Path(dataset.root).resolve()}  model: {bundle.name} "
          f"({sum(p.numel() for p in bundle.model.parameters()) / 1e6:.2f}M parameters, untrained)")
    for annotation in load_annotations(dataset.annotation_paths["test"])[:3]:
        result = captioner.caption_video(dataset.video_path(annotation.video_id))
        print(f"{annotation.video_id}: frames {result.frame_indices}\n  generated: {result.caption!r}\n"
              f"  reference: {annotation.captions[0]!r}")


if __name__ == "__main__":
    main()
