"""The `stgpt` command.

    stgpt caption VIDEO [--url http://host:8000]     ask a running deployment (jobs/serve.py, serve run ...)
    stgpt caption VIDEO --checkpoint DIR_OR_HUB_ID   caption offline, without a server
    options: --num-beams N --min-new-tokens N --max-new-tokens N --json

Prints the caption (or, with --json, the whole answer). Exit status 0 on success, 1 when the video could not be
captioned (the reason goes to stderr), 2 for a usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import httpx

from stgpt.client import DEFAULT_URL, caption
from stgpt.inference import Captioner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stgpt", description="SpaceTimeGPT video captioning.")
    commands = parser.add_subparsers(dest="command", required=True)
    cap = commands.add_parser("caption", help="caption one video", description="Caption one video, with a "
                              "running deployment (--url) or offline (--checkpoint).")
    cap.add_argument("video", help="video file (uploaded: the server needs no access to it)")
    where = cap.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help=f"the deployment's base URL (default {DEFAULT_URL})")
    where.add_argument("--checkpoint", help="caption offline with this checkpoint directory or hub id")
    cap.add_argument("--num-beams", type=int)
    cap.add_argument("--min-new-tokens", type=int)
    cap.add_argument("--max-new-tokens", type=int)
    cap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server")
    cap.add_argument("--cpu", action="store_true", help="offline: stay on the CPU even if a GPU is there")
    cap.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    cap.set_defaults(run=run_caption)
    return parser


def run_caption(args: argparse.Namespace) -> int:
    generation = {key: value for key, value in (("num_beams", args.num_beams),
                                                ("min_new_tokens", args.min_new_tokens),
                                                ("max_new_tokens", args.max_new_tokens)) if value is not None}
    try:
        answer = caption_offline(args, generation) if args.checkpoint else caption_remote(args, generation)
    except Exception as exc:  # every failure is reported, none is a traceback
        print(f"stgpt caption: {args.video}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2, ensure_ascii=False) if args.json else answer["caption"])
    return 0


def caption_remote(args: argparse.Namespace, generation: dict) -> dict:
    url = args.url or DEFAULT_URL
    try:
        return caption(args.video, url, timeout_s=args.timeout, **generation)
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach {url} ({type(exc).__name__}: {exc})") from None


def caption_offline(args: argparse.Namespace, generation: dict) -> dict:
    captioner = Captioner.from_pretrained(args.checkpoint, use_gpu=not args.cpu)
    start = time.perf_counter()
    result = captioner.caption_video(args.video, **generation)
    return {"caption": result.caption, "frame_indices": result.frame_indices,
            "num_source_frames": result.num_source_frames, "model": captioner.name,
            "time_s": round(time.perf_counter() - start, 4)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `stgpt` console script."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
