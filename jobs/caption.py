"""Caption every video of a folder, bucket, glob or list on Ray: one caption per video, or per time window.

    python jobs/caption.py      # the embedded default: the trained (or tiny) checkpoint on the synthetic test videos
    python jobs/caption.py --videos DIR_OR_URI_OR_GLOB_OR_LIST --output OUT [--checkpoint C] [key=value ...]
    python jobs/caption.py --videos talks/ --output out/ caption.window_seconds=10   # long videos: 10 s windows
    ray job submit --working-dir . -- python jobs/caption.py --videos s3://bucket/raw --output s3://bucket/captions

Writes Parquet parts, captions.jsonl, errors.jsonl and manifest.json to --output (see stgpt/captioning.py).
Re-running into the same output resumes. Exit status: 0 done; 1 done, with errors for some videos; 2 nothing done
(bad arguments, no such input, or an output made with other settings: --overwrite replaces it).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/caption.py` from a checkout

from stgpt.captioning import CaptionError, VideoInput, caption_collection, synthetic_test_inputs  # noqa: E402
from stgpt.checkpoints import choose  # noqa: E402
from stgpt.launch import connect, exits, job_parser, parse  # noqa: E402
from stgpt.resources import Watchdog, exit_stalled  # noqa: E402


@exits(usage=(CaptionError,))
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--videos", help="a folder or URI (recursive), a glob, or a .txt/.csv/.jsonl/.parquet list")
    parser.add_argument("--output", help="output folder or URI (default: caption.output_dir)")
    parser.add_argument("--checkpoint", help="checkpoint directory (readable from every node) or hub id")
    parser.add_argument("--overwrite", action="store_true", help="replace an output made with other settings")
    args, cfg = parse(parser, argv)
    videos: str | list[VideoInput] = args.videos or synthetic_test_inputs(cfg)
    checkpoint = choose(args.checkpoint, cfg)
    if checkpoint.untrained:
        print(f"no trained checkpoint under {cfg.train.output_dir}: captioning with the untrained demo model")
    with connect(cfg), Watchdog.from_config("caption", cfg.cluster, on_fail=exit_stalled):
        summary = caption_collection(videos, args.output or cfg.caption.output_dir, checkpoint.path, cfg,
                                     overwrite=args.overwrite)
    print(summary.format())
    return 1 if summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
