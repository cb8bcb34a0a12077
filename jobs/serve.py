"""Serve captions over HTTP: the app and settings of configs/serve.yaml, on a local Ray or the cluster of RAY_ADDRESS.

    python jobs/serve.py                                  # default checkpoint (trained if present, else tiny)
    python jobs/serve.py --checkpoint outputs/train/best --port 8000 serve.max_batch_size=16
    curl -F video=@clip.mp4 http://127.0.0.1:8000/caption    # or: stgpt caption clip.mp4

`key=value` overrides go into the app's args: `serve.*` (batching, limits, timeout; defaults in ServeConfig,
stgpt/config.py), `generation.*` (default beam search), `encoder.*`; `cluster.*` sets the start-up stall limits.
For a cluster, use the same file with `serve deploy configs/serve.yaml`; a changed `user_config` there
reconfigures running replicas. Exit status 2: bad settings, or the replicas cannot fit the cluster; 1: they failed
to start, or did not start within `cluster.stall_fail_s` (the message says what Ray has pending).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/serve.py` from a checkout

from stgpt.config import CONFIG_DIR  # noqa: E402
from stgpt.launch import connect, exits, job_parser  # noqa: E402
from stgpt.serving import ServiceError, export_guard_env, load_service, serving, wait_for_interrupt  # noqa: E402


@exits(failed=(ServiceError,))
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, config=str(CONFIG_DIR / "serve.yaml"))
    parser.add_argument("--checkpoint", help="directory or hub id (default: trained checkpoint, else tiny demo)")
    parser.add_argument("--host", help="override http_options.host")
    parser.add_argument("--port", type=int, help="override http_options.port")
    parser.add_argument("--num-replicas", type=int, help="a fixed number of replicas instead of autoscaling")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before or after the options
    service = load_service(args.config, args.overrides, checkpoint=args.checkpoint, host=args.host,
                           port=args.port, num_replicas=args.num_replicas)
    print(f"Serving checkpoint {service.choice.path} [{service.choice.origin}]", flush=True)
    warning = export_guard_env(service.args.serve, service.http_options.get("host", "127.0.0.1"))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    try:
        with connect(service.cfg, service.plan()), serving(service) as url:
            print(f"Captioning at {url}/caption (docs: {url}/docs, health: {url}/healthz). Ctrl-C stops.",
                  flush=True)
            wait_for_interrupt()
    except KeyboardInterrupt:  # Ctrl-C before the replicas ran: the app is deleted all the same
        print("interrupted while the service was starting", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
