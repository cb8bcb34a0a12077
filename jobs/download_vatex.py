"""Download the VATEX clips of annotation files with yt-dlp, in parallel Ray tasks (one per video).

    python jobs/download_vatex.py --annotations vatex_training_v1.0.json [...] --videos data/vatex/videos
    python jobs/download_vatex.py --config configs/vatex.yaml      # data.annotations and data.videos from it
    ray job submit --working-dir . -- python jobs/download_vatex.py ... --videos s3://bucket/vatex/videos

Needs the yt-dlp executable (`pip install yt-dlp`) and ffmpeg on every node. Clips already in the folder are
skipped, videos YouTube reports gone are recorded in <videos>/unavailable.jsonl and not asked for again,
transient failures are retried; IDs that are not VATEX clip IDs (<11-character YouTube ID>_<start>_<end>) are
never asked for and are recorded there with the reason. Exit status: 0 when every clip is there or known unavailable; 1 when some
still failed after retries (listed in <videos>/failed.jsonl: run again later); 2 on bad input or set-up.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/download_vatex.py` from a checkout

from stgpt.config import ConfigError  # noqa: E402
from stgpt.download import DownloaderNotFound, download_vatex  # noqa: E402
from stgpt.launch import connect, exits, job_parser, parse  # noqa: E402
from stgpt.resources import Watchdog, exit_stalled  # noqa: E402


@exits(usage=(DownloaderNotFound,))
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, config=None)
    parser.add_argument("--annotations", nargs="+", help="VATEX annotation file(s) (default: data.annotations)")
    parser.add_argument("--videos", help="folder to download into, local or s3://... (default: data.videos)")
    parser.add_argument("--yt-dlp", dest="executable", default="yt-dlp", help="yt-dlp executable (default: on PATH)")
    parser.add_argument("--max-attempts", type=int, default=3, help="tries per video for transient failures")
    parser.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry, doubling")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one yt-dlp run may take")
    parser.add_argument("--concurrency", type=int, default=16, help="downloads at once over the cluster")
    parser.add_argument("--exact-cuts", action="store_true", help="re-encode at the cuts for frame-exact clips")
    parser.add_argument("--retry-unavailable", action="store_true", help="ask again for videos recorded as gone")
    args, cfg = parse(parser, argv)
    annotations = args.annotations or ([cfg.data.annotations] if cfg.data.annotations else None)
    videos = args.videos or cfg.data.videos
    if not annotations or not videos:
        raise ConfigError("give --annotations and --videos (or data.annotations and data.videos in --config)")
    with connect(cfg), Watchdog.from_config("download", cfg.cluster, on_fail=exit_stalled):
        summary = download_vatex(annotations, videos, executable=args.executable, max_attempts=args.max_attempts,
                                 backoff_s=args.backoff, timeout_s=args.timeout, exact_cuts=args.exact_cuts,
                                 concurrency=args.concurrency, retry_unavailable=args.retry_unavailable)
    print(summary.format())
    if summary.failed:
        print(f"error: {len(summary.failed)} clips failed after {args.max_attempts} attempts (see "
              f"{videos.rstrip('/')}/failed.jsonl); run again to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
