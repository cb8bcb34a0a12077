"""Caption a test split on Ray and score it with the standard captioning metrics, or score a prediction file.

    python jobs/evaluate.py        # the embedded default: the demo checkpoint on the synthetic test split
    python jobs/evaluate.py --checkpoint DIR_OR_HUB_ID --data SHARDS --output OUT [key=value ...]
    python jobs/evaluate.py --checkpoint C --data ANNOTATIONS.json --videos DIR --output OUT
    python jobs/evaluate.py --predictions P.json --references R.json --output OUT     # score only
    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint C --data /shared/shards ...

--data is a shard folder (its split evaluate.split, default test), a glob of shard files, one shard file, or an
annotation file whose videos are in --videos. With no --checkpoint: <train.output_dir>/best if training left
one, else a tiny untrained model (the job says so). Writes generated_captions.json, metrics.json,
per_video_scores.jsonl and errors.jsonl to --output (default evaluate.output_dir) and prints the table.
Exit status: 0 scored; 1 ran, but nothing could be scored, or it stalled (cluster.stall_fail_s); 2 nothing
done (bad arguments or inputs, or the actors do not fit the cluster: the message names the override).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/evaluate.py` from a checkout

from stgpt.annotations import AnnotationError  # noqa: E402
from stgpt.config import CONFIG_DIR, ConfigError, load_config  # noqa: E402
from stgpt.evaluation import (EvaluationError, evaluate, resolve_checkpoint, resolve_input,  # noqa: E402
                              score_files)
from stgpt.resources import ResourceError, Watchdog, exit_stalled, fit_evaluation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint directory (readable from every node) or hub id")
    parser.add_argument("--data", help="shard folder, shard glob or file, or an annotation file (with --videos)")
    parser.add_argument("--videos", help="folder of <videoID>.mp4/.webm files, for an annotation file as --data")
    parser.add_argument("--references", help="references to score against (VATEX JSON, COCO JSON or CSV); "
                        "with --data, instead of the data's own captions")
    parser.add_argument("--predictions", help="score only: generated captions in COCO result format")
    parser.add_argument("--output", help="output folder (default: evaluate.output_dir)")
    parser.add_argument("--split", help="the split of a shard folder to caption (default: evaluate.split)")
    parser.add_argument("--config", default=str(CONFIG_DIR / "tiny.yaml"), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. evaluate.num_actors=4 "
                        "generation.num_beams=4")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before or after the options

    try:
        cfg = load_config(args.config, args.overrides)
        if args.split:
            cfg.evaluate.split = args.split
        output = args.output or cfg.evaluate.output_dir
        if args.predictions:
            if args.checkpoint or args.data or args.videos:
                raise ConfigError("--predictions scores a file: it does not go with --checkpoint, --data or --videos")
            if not args.references:
                raise ConfigError("--predictions needs --references to score against")
            result = score_files(args.predictions, args.references, cfg, output)
        else:
            import ray

            started = not ray.is_initialized()
            if started:  # the cluster of RAY_ADDRESS (`ray job submit` sets it), else a local one that fits
                ray.init() if os.environ.get("RAY_ADDRESS") else ray.init(address="local", num_cpus=_local_cpus(cfg))
            try:
                cfg = fit_evaluation(cfg)  # before any work: too big for the cluster is exit 2 now, not a hang
                with Watchdog.from_config("caption", cfg.cluster, on_fail=exit_stalled):
                    inputs = resolve_input(args.data, cfg, videos=args.videos, references=args.references)
                    checkpoint, untrained = resolve_checkpoint(args.checkpoint, cfg)
                    result = evaluate(inputs, checkpoint, cfg, output, untrained=untrained)
            finally:
                if started:
                    ray.shutdown()  # stop our workers before exit, rather than have them killed mid-teardown
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (AnnotationError, ConfigError, ResourceError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.format())
    return 0


def _local_cpus(cfg) -> int:
    """A local Ray's CPUs: the machine's, or as many as the captioning actors and Ray Data's reads ask for."""
    e = cfg.evaluate
    actors = e.num_actors if isinstance(e.num_actors, int) else 1
    return max(os.cpu_count() or 1, math.ceil(actors * e.cpus_per_actor + cfg.cluster.data_cpus))


if __name__ == "__main__":
    sys.exit(main())
