"""Fine-tune SpaceTimeGPT with Ray Train, reading the Parquet shards that jobs/preprocess.py writes.

    python jobs/train.py                                    # embedded default: tiny model, synthetic data, local Ray
    python jobs/train.py --config configs/vatex.yaml train.num_workers=8
    ray job submit --working-dir . -- python jobs/train.py --config configs/tiny.yaml train.output_dir=/shared/run

Ray: the cluster of RAY_ADDRESS (`ray job submit` sets it) or `cluster.address`, else a new local one. With no
`data.annotations` the data is the synthetic dataset, made and preprocessed into `data.shards` first if
missing, and at the end the best checkpoint captions the synthetic test split (colour / shape / motion accuracy).
Output: `<train.output_dir>/best` (a plain Hugging Face checkpoint), `tensorboard/`, `summary.json`; re-running
with the same `train.output_dir` resumes. Exit status 2: bad config, or the job cannot fit the cluster (the
message names the numbers and the override); 1: it stalled for `cluster.stall_fail_s`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/train.py` from a checkout

from stgpt.launch import connect, exits, job_parser, parse  # noqa: E402
from stgpt.resources import fit_training, training_plan  # noqa: E402
from stgpt.trainer import train  # noqa: E402


@exits()
def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(job_parser(__doc__), argv)
    start = time.perf_counter()
    with connect(cfg, training_plan(cfg)):
        cfg = fit_training(cfg)  # before any work: a job that cannot fit the cluster says so now, not by hanging
        result, tested = train(cfg)
    print(f"best checkpoint: {result.best_dir}  ({cfg.train.checkpoint_metric}="
          f"{result.best_metrics.get(cfg.train.checkpoint_metric)}, epoch {result.best_metrics.get('epoch')})")
    print(f"tensorboard --logdir {Path(cfg.train.output_dir).resolve() / 'tensorboard'}")
    if tested is not None and tested.attribute_accuracy:
        accuracy = tested.attribute_accuracy
        print("synthetic test split, attributes named right by generated captions (chance: colour 25%, shape 33%, "
              "motion 17%): " + ", ".join(f"{k} {accuracy[k]:.1%}" for k in ("colour", "shape", "motion"))
              + f"; whole video right {accuracy['video']:.1%} of {int(accuracy['num_videos'])}")
        if tested.info.get("per_motion"):
            print("motion per direction (one-object videos): "
                  + ", ".join(f"{m} {v:.0%}" for m, v in tested.info["per_motion"].items()))
        if tested.info.get("time_reversal"):
            reversal = tested.info["time_reversal"]
            print(f"time reversal (played backwards, against the flipped motions): motion {reversal['motion']:.1%}; "
                  f"the caption flips with the video for {reversal['flips_with_video']:.1%} of one-object videos")
        for video_id in sorted(tested.predictions)[:3]:
            print(f"  {video_id}: {tested.predictions[video_id]!r}  reference {tested.references[video_id][0]!r}")
    if result.stage_seconds:
        print("training time: " + ", ".join(f"{name} {value:.0f} s" for name, value in result.stage_seconds.items()))
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
