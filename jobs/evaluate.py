"""Caption a test split on Ray and score it with the standard captioning metrics, or score a prediction file.

    python jobs/evaluate.py        # the embedded default: the demo checkpoint on the synthetic test split
    python jobs/evaluate.py --checkpoint DIR_OR_HUB_ID --data SHARDS --output OUT [key=value ...]
    python jobs/evaluate.py --checkpoint C --data ANNOTATIONS.json --videos DIR --output OUT
    python jobs/evaluate.py --predictions P.json --references R.json --output OUT     # score only
    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint C --data /shared/shards ...

--data is a shard folder (its split evaluate.split, default test), a glob of shard files, one shard file, or an
annotation file whose videos are in --videos. With no --checkpoint: <train.output_dir>/best if training left
one, else the tiny untrained demo checkpoint (the job says so). Writes generated_captions.json, metrics.json,
per_video_scores.jsonl and errors.jsonl to --output (default evaluate.output_dir) and prints the table.
Exit status: 0 scored; 1 ran, but nothing could be scored, or it stalled (cluster.stall_fail_s); 2 nothing
done (bad arguments or inputs, or the actors do not fit the cluster: the message names the override).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/evaluate.py` from a checkout

from stgpt.checkpoints import choose  # noqa: E402
from stgpt.config import ConfigError  # noqa: E402
from stgpt.evaluation import EvaluationError, check_metrics, evaluate, resolve_input, score_files  # noqa: E402
from stgpt.launch import connect, exits, job_parser, parse  # noqa: E402
from stgpt.resources import Watchdog, evaluation_plan, exit_stalled, fit_evaluation  # noqa: E402


@exits(failed=(EvaluationError,))
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--checkpoint", help="checkpoint directory (readable from every node) or hub id")
    parser.add_argument("--data", help="shard folder, shard glob or file, or an annotation file (with --videos)")
    parser.add_argument("--videos", help="folder of <videoID>.mp4/.webm files, for an annotation file as --data")
    parser.add_argument("--references", help="references to score against (VATEX JSON, COCO JSON or CSV); "
                        "with --data, instead of the data's own captions")
    parser.add_argument("--predictions", help="score only: generated captions in COCO result format")
    parser.add_argument("--output", help="output folder (default: evaluate.output_dir)")
    parser.add_argument("--split", help="the split of a shard folder to caption (default: evaluate.split)")
    args, cfg = parse(parser, argv)
    cfg.evaluate.split = args.split or cfg.evaluate.split
    output = args.output or cfg.evaluate.output_dir
    check_metrics(cfg)  # unknown metric names are refused before any work, not after an hour of generation
    if args.predictions and (args.checkpoint or args.data or args.videos or not args.references):
        raise ConfigError("--predictions scores a file against --references: it does not go with --checkpoint, "
                          "--data or --videos")
    if args.predictions:  # on the cluster only if the metrics run in parallel
        with connect(cfg) if cfg.evaluate.metric_workers > 1 else contextlib.nullcontext():
            result = score_files(args.predictions, args.references, cfg, output)
    else:
        with connect(cfg, evaluation_plan(cfg)):
            cfg = fit_evaluation(cfg)  # before any work: too big for the cluster is exit 2 now, not a hang
            with Watchdog.from_config("caption", cfg.cluster, on_fail=exit_stalled):
                inputs = resolve_input(args.data, cfg, videos=args.videos, references=args.references)
                checkpoint = choose(args.checkpoint, cfg)
                result = evaluate(inputs, checkpoint.path, cfg, output, untrained=checkpoint.untrained)
    print(result.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
