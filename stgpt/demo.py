"""The demo: the whole suite on the synthetic dataset, step by step, and a report of what the model learned.

1. make the synthetic moving-shapes dataset and preprocess it into Parquet shards with Ray Data;
2. evaluate the untrained demo checkpoint on the test split (the "before" figures);
3. train the tiny model with Ray Train (2 workers, DDP) as SpaceTimeGPT was made: pretrain the encoder as a
   video classifier and the decoder as a language model, then fine-tune the captioner from the two;
4. evaluate the trained model on the test split in parallel (CIDEr-D, colour / shape / motion accuracy, and
   motion on the test videos played backwards: the time-reversal check);
5. serve it with Ray Serve and caption a test video over HTTP;
6. write a report: figures before and after, a few test videos with their captions, and a picture of them.
Every step resumes or reuses what an earlier run left. Outputs go under `outputs/` (data, shards, train, demo).
"""
from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

from ray import serve

from stgpt.checkpoints import ensure_demo_checkpoint
from stgpt.client import caption
from stgpt.config import Config
from stgpt.evaluation import evaluate, synthetic_input
from stgpt.pretraining import run_pretraining, stage_seconds
from stgpt.report import CaptionedVideo, caption_strip
from stgpt.serving import build_app
from stgpt.synthetic import SyntheticDataset
from stgpt.trainer import prepare_synthetic_shards, run_training
from stgpt.video import read_video

DEMO_DIR = Path("outputs/demo")
REPORT_FILE = DEMO_DIR / "report.json"
EXAMPLES = 4


def step(number: int, text: str) -> float:
    print(f"\n=== [{number}/6] {text}", flush=True)
    return time.perf_counter()


def run_demo(cfg: Config) -> dict:
    """Steps 1-6 on the connected Ray (see the module docstring); the report as a dict (also report.json)."""
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    t = step(1, "synthetic dataset -> Parquet shards (Ray Data)")
    prepare_synthetic_shards(cfg)
    test = synthetic_input(cfg)
    print(f"    {time.perf_counter() - t:.0f} s; shards in {Path(cfg.data.shards).resolve()}")

    t = step(2, "evaluate the untrained model on the test split")
    untrained = ensure_demo_checkpoint(cfg=cfg)  # the one demo checkpoint, built from this config if missing
    no_reversal = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, time_reversal=False))
    before = evaluate(test, str(untrained.resolve()), no_reversal, DEMO_DIR / "eval_before", untrained=True,
                      log=lambda _: None)
    print(f"    {time.perf_counter() - t:.0f} s; CIDEr-D {100 * before.report.corpus['CIDEr-D']:.1f}")

    t = step(3, f"train the tiny model with Ray Train ({cfg.train.num_workers} workers): pretraining stages, "
                f"then {cfg.train.epochs} epochs of captioning")
    cfg, stages = run_pretraining(cfg)
    trained = run_training(cfg)
    if trained.best_dir is None:
        raise RuntimeError("training produced no checkpoint")
    seconds = stage_seconds(stages, trained.seconds)
    print(f"    {time.perf_counter() - t:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}); "
          f"best checkpoint {trained.best_dir}")

    t = step(4, "evaluate the trained model on the test split")
    after = evaluate(test, str(trained.best_dir), cfg, DEMO_DIR / "eval_after", log=lambda _: None)
    print(after.format())

    t = step(5, "serve the trained model (Ray Serve) and caption a test video over HTTP")
    served = serve_and_caption(trained.best_dir, cfg)
    print(f"    {time.perf_counter() - t:.0f} s; {served['video_id']}: {served['caption']!r}")

    step(6, "report")
    examples = sorted(after.predictions)[:EXAMPLES]
    picture = write_picture(cfg, examples, after.predictions, after.references)
    return {
        "before": summary_figures(before), "after": summary_figures(after),
        "examples": [{"video_id": v, "generated": after.predictions[v], "reference": after.references[v][0]}
                     for v in examples],
        "served": served, "training_seconds": seconds,
        "time_reversal": {key: round(100 * value, 1) for key, value in
                          (after.info.get("time_reversal") or {}).items() if key != "num_videos"},
        "per_motion": {key: round(100 * value, 1) for key, value in (after.info.get("per_motion") or {}).items()},
        "outputs": {"shards": str(Path(cfg.data.shards).resolve()), "checkpoint": str(trained.best_dir),
                    "tensorboard": str(Path(cfg.train.output_dir).resolve() / "tensorboard"),
                    "eval_before": str((DEMO_DIR / "eval_before").resolve()),
                    "eval_after": str((DEMO_DIR / "eval_after").resolve()), "picture": str(picture.resolve())},
    }


def summary_figures(result) -> dict:
    accuracy = result.attribute_accuracy or {}
    return {"CIDEr-D": round(100 * result.report.corpus["CIDEr-D"], 2),
            **{key: round(100 * accuracy[key], 1) for key in ("colour", "shape", "motion") if key in accuracy}}


def serve_and_caption(checkpoint: Path, cfg: Config) -> dict:
    """Deploy the caption app on a free local port, POST one test video to it, then take the app down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(checkpoint), "deployment": {"num_replicas": 1}}), name="demo",
              route_prefix="/")
    dataset = SyntheticDataset.from_root(cfg.data.root)
    video_id = dataset.video_ids("test")[0]
    answer = caption(dataset.video_path(video_id), f"http://127.0.0.1:{port}")
    serve.delete("demo")
    return {"video_id": video_id, "url": f"http://127.0.0.1:{port}/caption", "caption": answer["caption"],
            "time_s": answer.get("time_s")}


def write_picture(cfg: Config, video_ids: list[str], predictions: dict, references: dict) -> Path:
    dataset = SyntheticDataset.from_root(cfg.data.root)
    videos = [CaptionedVideo(v, read_video(dataset.video_path(v), cfg.video.num_frames).frames, predictions[v],
                             references[v][0]) for v in video_ids]
    return caption_strip(videos, DEMO_DIR / "captions.png")


def print_report(report: dict) -> None:
    before, after = report["before"], report["after"]
    print("\n=== stgpt demo report")
    print(f"{'':22}{'before':>10}{'after':>10}")
    for key in ("CIDEr-D", "colour", "shape", "motion"):
        unit = "" if key == "CIDEr-D" else " %"
        label = key if key == "CIDEr-D" else f"{key} accuracy{unit}"
        print(f"{label:22}{before.get(key, float('nan')):>10.1f}{after.get(key, float('nan')):>10.1f}")
    print("(chance accuracy: colour 25%, shape 33%, motion 17%)")
    if report.get("per_motion"):
        print("motion per direction, one-object videos: "
              + ", ".join(f"{m} {v:.0f}%" for m, v in report["per_motion"].items()))
    reversal = report.get("time_reversal") or {}
    if reversal:
        print(f"time reversal (test videos played backwards, scored on the flipped motions): motion "
              f"{reversal['motion']:.1f}%; the caption flips with the video for {reversal['flips_with_video']:.1f}% "
              "of one-object videos")
    print(f"training time: {', '.join(f'{k} {v:.0f} s' for k, v in report.get('training_seconds', {}).items())}\n")
    for example in report["examples"]:
        print(f"{example['video_id']}\n  generated: {example['generated']}\n  reference: {example['reference']}")
    served = report["served"]
    print(f"\nover HTTP ({served['url']}): {served['video_id']} -> {served['caption']!r}")
    print("\noutputs:")
    for key, path in report["outputs"].items():
        print(f"  {key:12} {path}")
    print(f"\ndone in {report['wall_seconds'] / 60:.1f} min")
