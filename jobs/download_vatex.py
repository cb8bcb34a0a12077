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

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/download_vatex.py` from a checkout

from stgpt.annotations import AnnotationError  # noqa: E402
from stgpt.config import ConfigError, load_config  # noqa: E402
from stgpt.download import DownloaderNotFound, download_vatex  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", nargs="+", help="VATEX annotation file(s) (default: data.annotations)")
    parser.add_argument("--videos", help="folder to download into, local or s3://... (default: data.videos)")
    parser.add_argument("--config", help="YAML config whose data section gives the defaults")
    parser.add_argument("--yt-dlp", dest="executable", default="yt-dlp", help="yt-dlp executable (default: on PATH)")
    parser.add_argument("--max-attempts", type=int, default=3, help="tries per video for transient failures")
    parser.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry, doubling")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one yt-dlp run may take")
    parser.add_argument("--concurrency", type=int, default=16, help="downloads at once over the cluster")
    parser.add_argument("--exact-cuts", action="store_true", help="re-encode at the cuts for frame-exact clips")
    parser.add_argument("--retry-unavailable", action="store_true", help="ask again for videos recorded as gone")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.videos=/mnt/vatex")
    args = parser.parse_args(argv)

    try:
        cfg = load_config(args.config, args.overrides)
        annotations = args.annotations or ([cfg.data.annotations] if cfg.data.annotations else None)
        videos = args.videos or cfg.data.videos
        if not annotations or not videos:
            raise ConfigError("give --annotations and --videos (or data.annotations and data.videos in --config)")
        import ray

        if not ray.is_initialized():
            ray.init()  # joins the cluster of RAY_ADDRESS or `ray job submit`, else starts a local one
        summary = download_vatex(annotations, videos, executable=args.executable, max_attempts=args.max_attempts,
                                 backoff_s=args.backoff, timeout_s=args.timeout, exact_cuts=args.exact_cuts,
                                 concurrency=args.concurrency, retry_unavailable=args.retry_unavailable)
    except (AnnotationError, ConfigError, DownloaderNotFound, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.format())
    if summary.failed:
        print(f"error: {len(summary.failed)} clips failed after {args.max_attempts} attempts (see "
              f"{videos.rstrip('/')}/failed.jsonl); run again to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
