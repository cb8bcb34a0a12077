"""The caption service as a Ray Serve application: its typed arguments, the builder, and starting it from a job.

    POST /caption   the video (multipart field `video`, or the raw body); optional num_beams, min_new_tokens,
                    max_new_tokens. Answers {"caption", "frame_indices", "num_source_frames", "model",
                    "generation", "batch_size", "time_s", "timings"}; every refusal {"error", "detail"}.
    GET  /healthz   {"status": "ok", "model", "device", "replica", "pid"} (open: no token needed)
    GET  /docs      OpenAPI docs

`build_app(AppArgs)` is the Serve `import_path` entry (`stgpt.serving:build_app`, configs/serve.yaml); Serve
validates a config file's `args` into `AppArgs`, so a misspelt key fails the deploy, naming it. The HTTP layer is
stgpt/serving_http.py, the replica stgpt/serving_deployment.py, the proxy's guard stgpt/serving_guard.py.
`Service` and `serving` are jobs/serve.py's library: the Serve file with the command line applied, the guard's
environment, the fit check, and a start-up that reports what Ray has pending instead of waiting silently.

(No `from __future__ import annotations`: Serve reads `build_app`'s annotation to validate its args.)
"""
import logging
import os
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

from stgpt.checkpoints import Choice, choose
from stgpt.config import Config, ConfigError, EncoderConfig, GenerationConfig, ServeConfig, load_config
from stgpt.device import PRECISIONS
from stgpt.resources import Plan, Watchdog, ensure_fits, serving_plan
from stgpt.serving_deployment import LIVE_SETTINGS, CaptionDeployment, live_settings
from stgpt.serving_guard import MAX_UPLOAD_ENV, PROXY_CALLBACK, PROXY_CALLBACK_ENV, TOKEN_ENV

logger = logging.getLogger("ray.serve")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
OVERRIDE_SECTIONS = ("serve", "generation", "encoder", "cluster")  # what jobs/serve.py's key=value may set

# Generation defaults for requests that set none: only the keys given (the rest come from the checkpoint's own
# generation config), each typed as in GenerationConfig.
GenerationArgs = create_model(
    "GenerationArgs", __config__=ConfigDict(extra="forbid"),
    **{name: (Optional[hint], None) for name, hint in typing.get_type_hints(GenerationConfig).items()})


class AppArgs(BaseModel):
    """The application's arguments (a Serve config file's `args`), all optional."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Optional[str] = None  # directory or hub id; None: training's best, else the demo checkpoint
    serve: ServeConfig = Field(default_factory=ServeConfig)  # batching, limits, timeout (ServeConfig's defaults)
    generation: GenerationArgs = Field(default_factory=GenerationArgs)
    # Serve deployment options applied in code (num_replicas, autoscaling_config, ray_actor_options,
    # user_config, ...); a Serve config file's `deployments:` section does the same and wins over these.
    deployment: dict[str, Any] = Field(default_factory=dict)
    precision: Literal[PRECISIONS] = "auto"
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)  # how the TimeSformer runs (stgpt/encoder.py)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, values: Any) -> Any:
        unknown = sorted(set(values) - set(cls.model_fields)) if isinstance(values, dict) else []
        if unknown:
            raise ValueError(f"unknown app arg(s) {', '.join(unknown)}; known: {', '.join(cls.model_fields)}")
        return values

    @classmethod
    def parse(cls, values: Any) -> "AppArgs":
        """Validated args; a ConfigError naming each bad key (Serve reports pydantic's own error instead)."""
        try:
            return cls.model_validate(values or {})
        except ValidationError as exc:
            raise ConfigError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}"
                                        for e in exc.errors())) from None


def build_app(args: AppArgs) -> Application:
    """The Serve application (`import_path: stgpt.serving:build_app`); `args` may also be a plain dict.

    The live settings (LIVE_SETTINGS of `args.serve`) go to the replicas as Serve's `user_config`, under any
    `user_config` the deployment options give, so a `serve deploy` that changes them reconfigures running replicas.
    """
    args = args if isinstance(args, AppArgs) else AppArgs.parse(args)
    choice = choose(args.checkpoint)
    logger.info("stgpt serving checkpoint %s [%s]", choice.path, choice.origin)
    settings = args.serve
    options = dict(args.deployment)
    options["user_config"] = {**{k: getattr(settings, k) for k in LIVE_SETTINGS}, **(options.get("user_config") or {})}
    live_settings(settings, options["user_config"])  # a bad user_config fails here, not in every replica
    options.setdefault("max_ongoing_requests", max(settings.max_ongoing_requests, 2 * settings.max_batch_size))
    try:
        deployment = CaptionDeployment.options(**options)
    except (TypeError, ValueError) as exc:  # Serve's own checks (a pydantic ValidationError is a ValueError)
        raise ConfigError(f"deployment options: {' '.join(str(exc).split())}") from None
    return deployment.bind(
        choice.path, settings, args.generation.model_dump(exclude_unset=True), args.precision, choice.untrained,
        args.encoder)


# --------------------------------------------------------------------------------------------------------
# A Serve config file, and the service jobs/serve.py runs from it.


@dataclass
class ServeFile:
    """One application of a Serve config file and the file's HTTP options."""

    app_args: dict[str, Any]  # build_app args, the file's `deployments:` options folded into (and over) `deployment`
    name: str
    route_prefix: str
    http_options: dict[str, Any] = field(default_factory=dict)
    proxy_location: Optional[str] = None


def load_serve_file(path: str | os.PathLike, app_name: Optional[str] = None) -> ServeFile:
    """Read a Serve config file (validated with Serve's own schema) for running its stgpt app with `serve.run`."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    schema = ServeDeploySchema.model_validate(raw)
    apps = [a for a in raw.get("applications", []) if app_name in (None, a.get("name"))]
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected one application{f' named {app_name!r}' if app_name else ''}, "
                          f"found {len(apps)}")
    spec = apps[0]
    args = dict(spec.get("args") or {})
    mine = [d for d in spec.get("deployments") or [] if d.get("name") == CaptionDeployment.name]
    if mine:  # as `serve deploy` applies them: the file's deployment options over the args' own
        args["deployment"] = {**(args.get("deployment") or {}), **{k: v for k, v in mine[0].items() if k != "name"}}
    http = schema.http_options.model_dump(exclude_unset=True) if "http_options" in raw else {}
    return ServeFile(app_args=args, name=spec.get("name", "default"), route_prefix=spec.get("route_prefix", "/"),
                     http_options=http, proxy_location=raw.get("proxy_location"))


class ServiceError(RuntimeError):
    """The service did not come up: a replica failed to start, or none started within cluster.stall_fail_s."""


@dataclass
class Service:
    """A Serve file's app with a job's changes: validated args, the chosen checkpoint, HTTP and cluster settings."""

    file: ServeFile
    args: AppArgs
    choice: Choice
    http_options: dict[str, Any]
    cfg: Config  # its cluster section: where to connect, stall limits

    @property
    def replicas(self) -> int:
        """Replicas that must run before the service answers: the fixed count, else autoscaling's minimum."""
        options = self.args.deployment
        return options.get("num_replicas") or (options.get("autoscaling_config") or {}).get("min_replicas", 1)

    def plan(self) -> Plan:
        return serving_plan(self.replicas, self.args.deployment.get("ray_actor_options") or {})

    @property
    def url(self) -> str:
        host = self.http_options.get("host", "127.0.0.1")
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"http://{host}:{self.http_options.get('port', 8000)}{self.file.route_prefix.rstrip('/')}"


def load_service(path: str | os.PathLike, overrides: Sequence[str] = (), checkpoint: Optional[str] = None,
                 host: Optional[str] = None, port: Optional[int] = None,
                 num_replicas: Optional[int] = None) -> Service:
    """The app of the Serve file at `path` with a command line applied: `serve.*`, `generation.*` and `encoder.*`
    overrides into its args, `cluster.*` into the job's cluster settings, and a fixed replica count in place of
    autoscaling. ConfigError for a bad key or value."""
    file = load_serve_file(path)
    args = dict(file.app_args)
    cluster = []
    for item in overrides:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in OVERRIDE_SECTIONS or not name:
            raise ConfigError(f"override {item!r} must look like SECTION.KEY=VALUE, SECTION one of "
                              f"{', '.join(OVERRIDE_SECTIONS)}")
        if section == "cluster":
            cluster.append(item)
        else:
            args[section] = {**(args.get(section) or {}), name: yaml.safe_load(value)}
    if checkpoint:
        args["checkpoint"] = checkpoint
    if num_replicas:
        deployment = {k: v for k, v in (args.get("deployment") or {}).items() if k != "autoscaling_config"}
        args["deployment"] = {**deployment, "num_replicas": num_replicas}
    parsed = AppArgs.parse(args)
    choice = choose(parsed.checkpoint)
    parsed = parsed.model_copy(update={"checkpoint": choice.path})
    http = {**file.http_options, **{k: v for k, v in (("host", host), ("port", port)) if v}}
    return Service(file, parsed, choice, http, load_config(None, cluster))


def export_guard_env(settings: ServeConfig, host: str) -> Optional[str]:
    """Set what Ray's proxy loads the guard from (stgpt/serving_guard.py): a local Ray started after this inherits
    it; a cluster's nodes must have it set (the cluster manifests do). A warning if the port is open to all."""
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    os.environ[MAX_UPLOAD_ENV] = str(settings.max_upload_mb)
    if settings.auth_token:
        os.environ[TOKEN_ENV] = settings.auth_token
    if host not in LOCAL_HOSTS and not os.environ.get(TOKEN_ENV):
        return (f"WARNING: listening on {host} with no token: anyone who can reach this port may caption "
                f"(set {TOKEN_ENV} or serve.auth_token)")
    return None


@contextmanager
def serving(service: Service, log: Callable[[str], None] = print) -> Iterator[str]:
    """Run the service on the connected cluster, yielding its base URL once its replicas run; the application is
    deleted at the end (only it: a joined cluster may serve others). ResourceError if the replicas cannot fit,
    ServiceError if they do not start."""
    ensure_fits(service.plan(), service.cfg.cluster, log)
    serve.start(http_options=service.http_options, proxy_location=service.file.proxy_location)
    name, running = service.file.name, False
    try:
        serve.run_many([serve.RunTarget(build_app(service.args), name=name, route_prefix=service.file.route_prefix)],
                       wait_for_applications_running=False)  # waited for below, saying why it takes long
        wait_until_running(name, service.cfg, log)
        running = True
        yield service.url
    finally:  # replicas that never started have no requests to finish: no grace period for them
        serve.delete(name, _blocking=running)


def wait_until_running(app_name: str, cfg: Config, log: Callable[[str], None] = print, poll_s: float = 0.5) -> None:
    """Wait for an application's replicas. While none starts for `cluster.stall_warn_s`, log what Ray has
    pending (replicas it cannot place, say); past `cluster.stall_fail_s` raise ServiceError with that report."""
    def progress() -> Any:
        app = serve.status().applications.get(app_name)
        return app and (app.status, [(d.status, d.replica_states) for d in app.deployments.values()])

    with Watchdog.from_config("replica start", cfg.cluster, probe=progress, log=log) as watchdog:
        while True:
            app = serve.status().applications.get(app_name)
            if app is not None and app.status == ApplicationStatus.RUNNING:
                return
            if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
                raise ServiceError(f"application {app_name} failed to deploy: {app.message}")
            if watchdog.failed:
                raise ServiceError(watchdog.failed)
            time.sleep(poll_s)


def wait_for_interrupt() -> None:
    """Block until Ctrl-C (the service runs in Ray meanwhile)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
