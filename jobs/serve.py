"""Serve captions over HTTP on a local Ray: the app and settings of configs/serve.yaml, run with `serve.run`.

    python jobs/serve.py                                  # default checkpoint (trained if present, else tiny)
    python jobs/serve.py --checkpoint outputs/train/best --port 8000 serve.max_batch_size=16
    curl -F video=@clip.mp4 http://127.0.0.1:8000/caption    # or: stgpt caption clip.mp4

`key=value` overrides go into the app's args: `serve.*` (batching, limits, timeout) and `generation.*` (default
beam search). For a cluster, use the same file with `serve deploy configs/serve.yaml`.
"""
import argparse
import logging
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stgpt.config import CONFIG_DIR, ClusterConfig, load_config  # noqa: E402
from stgpt.resources import ResourceError, ensure_fits, serving_plan  # noqa: E402
from stgpt.checkpoints import choose  # noqa: E402
from stgpt.serving import build_app, load_serve_file  # noqa: E402
from stgpt.serving_guard import MAX_UPLOAD_ENV, PROXY_CALLBACK, PROXY_CALLBACK_ENV, TOKEN_ENV  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="directory or hub id (default: trained checkpoint, else tiny demo)")
    parser.add_argument("--config", default=str(CONFIG_DIR / "serve.yaml"), help="Serve config file")
    parser.add_argument("--host", help="override http_options.host")
    parser.add_argument("--port", type=int, help="override http_options.port")
    parser.add_argument("--num-replicas", type=int, help="a fixed number of replicas instead of autoscaling")
    parser.add_argument("overrides", nargs="*", help="serve.KEY=VALUE, generation.KEY=VALUE or encoder.KEY=VALUE")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before or after the options
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    spec = load_serve_file(args.config)
    app_args = dict(spec.app_args)
    choice = choose(args.checkpoint or app_args.get("checkpoint"))
    app_args["checkpoint"] = choice.path
    print(f"Serving checkpoint {choice.path} [{choice.origin}]", flush=True)
    for item in args.overrides:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in ("serve", "generation", "encoder") or not name:
            parser.error(f"override {item!r} must look like serve.KEY=VALUE, generation.KEY=VALUE or "
                         "encoder.KEY=VALUE")
        app_args[section] = {**(app_args.get(section) or {}), name: yaml.safe_load(value)}
    if args.num_replicas:
        deployment = dict(app_args.get("deployment") or {})
        deployment.pop("autoscaling_config", None)
        app_args["deployment"] = {**deployment, "num_replicas": args.num_replicas}
    http = {**spec.http_options, **{k: v for k, v in (("host", args.host), ("port", args.port)) if v}}

    import ray
    from ray import serve

    # The proxy checks the token and the upload size before reading a body (stgpt/serving_guard.py): Ray loads the
    # guard from these variables in the nodes' environment, which a local Ray started here inherits. A cluster
    # joined through RAY_ADDRESS must have them set on its nodes (the cluster manifests do).
    settings = load_config(None, [f"serve.{k}={yaml.safe_dump(v).strip()}" for k, v in
                                  (app_args.get("serve") or {}).items()]).serve
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    os.environ[MAX_UPLOAD_ENV] = str(settings.max_upload_mb)
    if settings.auth_token:
        os.environ[TOKEN_ENV] = settings.auth_token
    if http.get("host", "127.0.0.1") not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(TOKEN_ENV):
        print(f"WARNING: listening on {http['host']} with no token: anyone who can reach this port may caption "
              f"(set {TOKEN_ENV} or serve.auth_token)", file=sys.stderr, flush=True)
    # RAY_ADDRESS joins a running cluster on purpose; otherwise start a fresh local Ray, never someone else's.
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    deployment = app_args.get("deployment") or {}
    replicas = deployment.get("num_replicas") or (deployment.get("autoscaling_config") or {}).get("min_replicas", 1)
    try:  # replicas that cannot be placed would leave serve.run waiting with no word
        ensure_fits(serving_plan(replicas, deployment.get("ray_actor_options") or {}), ClusterConfig())
    except ResourceError as exc:
        print(f"error: {exc} (or --num-replicas, ray_actor_options in {args.config})", file=sys.stderr)
        sys.exit(2)
    serve.start(http_options=http, proxy_location=spec.proxy_location)
    app = build_app(app_args)
    serve.run(app, name=spec.name, route_prefix=spec.route_prefix)
    host = http.get("host", "127.0.0.1")
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http.get('port', 8000)}"
    base += spec.route_prefix.rstrip("/")
    print(f"Captioning at {base}/caption (docs: {base}/docs, health: {base}/healthz). Ctrl-C stops.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
