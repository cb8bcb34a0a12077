"""The whole suite on local Ray, with no flags and no downloads: the README's main job.

    python jobs/demo.py                       # about 11 minutes on a 2-core CPU
    python jobs/demo.py train.epochs=4        # any config override

1. make the synthetic moving-shapes dataset and preprocess it into Parquet shards with Ray Data;
2. evaluate an untrained tiny model on the test split (the "before" figures);
3. train the tiny model with Ray Train (2 workers, DDP);
4. evaluate the trained model on the test split in parallel (CIDEr-D and colour / shape / motion accuracy);
5. serve it with Ray Serve and caption a test video over HTTP;
6. write a report: figures before and after, a few test videos with their captions, and a picture of them.

Every step resumes or reuses what an earlier run left (an interrupted demo is simply run again). Outputs go under
`outputs/` (data, shards, train, demo).
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/demo.py` from a checkout

from stgpt.config import CONFIG_DIR, Config, load_config  # noqa: E402

DEMO_DIR = Path("outputs/demo")
EXAMPLES = 4


def step(number: int, text: str) -> float:
    print(f"\n=== [{number}/6] {text}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG_DIR / "tiny.yaml"), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=4")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before or after the options
    cfg = load_config(args.config, args.overrides)
    if cfg.data.annotations is not None:
        parser.error("the demo runs on the synthetic dataset: leave data.annotations unset")
    start = time.perf_counter()

    import ray

    from stgpt.training import init_local_ray, local_ray_cpus

    # One local Ray for every step, as jobs/train.py starts it (training's workers plus a CPU for Ray Data).
    init_local_ray(num_cpus=local_ray_cpus(cfg), log_to_driver=False)
    try:
        report = run_demo(cfg)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    (DEMO_DIR / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    return 0


def run_demo(cfg: Config) -> dict:
    from stgpt.evaluation import ensure_untrained_checkpoint, evaluate, synthetic_input
    from stgpt.training import prepare_synthetic_shards, run_training

    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    t = step(1, "synthetic dataset -> Parquet shards (Ray Data)")
    prepare_synthetic_shards(cfg)
    test = synthetic_input(cfg)
    print(f"    {time.perf_counter() - t:.0f} s; shards in {Path(cfg.data.shards).resolve()}")

    t = step(2, "evaluate the untrained model on the test split")
    untrained = ensure_untrained_checkpoint(DEMO_DIR / "untrained", cfg)
    before = evaluate(test, str(untrained.resolve()), cfg, DEMO_DIR / "eval_before", untrained=True,
                      log=lambda _: None)
    print(f"    {time.perf_counter() - t:.0f} s; CIDEr-D {100 * before.report.corpus['CIDEr-D']:.1f}")

    t = step(3, f"train the tiny model with Ray Train ({cfg.train.num_workers} workers, {cfg.train.epochs} epochs)")
    trained = run_training(cfg)
    if trained.best_dir is None:
        raise RuntimeError("training produced no checkpoint")
    print(f"    {time.perf_counter() - t:.0f} s; best checkpoint {trained.best_dir}")

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
        "served": served,
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
    from ray import serve

    from stgpt.client import caption
    from stgpt.serving import build_app
    from stgpt.synthetic import SyntheticDataset

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
    from stgpt.report import CaptionedVideo, caption_strip
    from stgpt.synthetic import SyntheticDataset
    from stgpt.video import read_video

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
    print("(chance accuracy: colour 25%, shape 33%, motion 17%)\n")
    for example in report["examples"]:
        print(f"{example['video_id']}\n  generated: {example['generated']}\n  reference: {example['reference']}")
    served = report["served"]
    print(f"\nover HTTP ({served['url']}): {served['video_id']} -> {served['caption']!r}")
    print("\noutputs:")
    for key, path in report["outputs"].items():
        print(f"  {key:12} {path}")
    print(f"\ndone in {report['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
