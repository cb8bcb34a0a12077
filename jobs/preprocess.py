"""Preprocess videos + VATEX annotations into Parquet shards with Ray Data, on one machine or a cluster.

    python jobs/preprocess.py --annotations A.json [B.json ...] --videos DIR --output OUT [--config C] [key=value ...]
    python jobs/preprocess.py                       # the embedded default: the synthetic dataset, all its splits
    python jobs/preprocess.py --config configs/vatex.yaml   # data.annotations / data.videos / data.shards from it
    ray job submit --working-dir . -- python jobs/preprocess.py --videos s3://bucket/videos --output s3://bucket/shards ...

--videos and --output take local paths or URIs pyarrow understands (s3://, gs://). Re-running into the same
output resumes. Exit status: 0 done; 1 done, but more videos failed than --max-error-rate allows; 2 nothing
done (bad annotation file, bad settings, or an output made with other settings).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/preprocess.py` from a checkout

from stgpt.launch import connect, exits, job_parser, parse  # noqa: E402
from stgpt.preprocessing import PreprocessError, preprocess, split_inputs  # noqa: E402
from stgpt.resources import Watchdog, ensure_fits, exit_stalled, preprocessing_plan  # noqa: E402


@exits(usage=(PreprocessError,))
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--annotations", nargs="+", help="VATEX-format annotation file(s), one split each")
    parser.add_argument("--videos", help="folder of <videoID>.mp4/.webm files (default: data.videos)")
    parser.add_argument("--output", help="folder for the shards (default: data.shards)")
    parser.add_argument("--split", help="split name for a single annotation file (default: from its file name)")
    parser.add_argument("--max-error-rate", type=float, help="fail the run above this fraction of unusable videos "
                        "(default: preprocess.max_error_rate, 0.05)")
    parser.add_argument("--overwrite", action="store_true", help="replace splits made with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")
    args, cfg = parse(parser, argv)
    if args.max_error_rate is not None:
        cfg.preprocess.max_error_rate = args.max_error_rate
    sources = split_inputs(cfg, args.annotations, args.videos, args.split)
    output = args.output or cfg.data.shards
    plan = preprocessing_plan(cfg)
    with connect(cfg, plan):
        ensure_fits(plan, cfg.cluster)  # one decoding actor at least: else exit 2 now
        with Watchdog.from_config("video", cfg.cluster, on_fail=exit_stalled):
            summary = preprocess(sources, output, cfg, overwrite=args.overwrite, progress=not args.no_progress)
    print(summary.format())
    if summary.too_many_errors:
        print(f"error: {summary.error_rate_message()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
