"""Caption videos over HTTP with Ray Serve: one deployment that batches beam search across requests.

    POST /caption   the video as a multipart upload (field `video`) or as the raw body; optional query (or form)
                    parameters num_beams, min_new_tokens, max_new_tokens. Answers
                    {"caption", "frame_indices", "num_source_frames", "model", "generation", "batch_size",
                     "time_s", "timings"}.
    GET  /healthz   {"status": "ok", "model", "device", "replica", "pid"} (open: no token needed)
    GET  /docs      OpenAPI docs (FastAPI's)

How a request flows through a replica. With a token configured (`serve.auth_token` or `$STGPT_SERVE_TOKEN`),
`/caption` answers 401 unless the request carries `Authorization: Bearer <token>`, before reading any of the
body (`stgpt/serving_guard.py` does the same, and the size check, inside Ray's proxy). The body is read with a
size cap (413 beyond it). Decoding runs in a child process per upload (`stgpt.isolation`), under the video
limits and killed at the request's deadline, so a crashing, hanging or oversized upload answers 422 (504 past
the deadline) and the replica serves the next request; a small thread pool waits on those children and runs
`to_pixel_values`, so the event loop stays free to accept, decode and queue other requests. Generation goes through `@serve.batch`, which collects up to
`max_batch_size` requests (waiting at most `batch_wait_timeout_s`) and runs one batched beam search in a single
model thread; requests with different generation parameters share the wait but are generated in separate groups.
Decoded requests enter the batch queue only while the model is idle: Ray closes the next batch as soon as the
current one starts, so without that gate requests arriving mid-generation go into small early batches.
Every request runs under `request_timeout_s` and answers 504 JSON past it. Every failure is a JSON
`{"error": code, "detail": message}`; a bad request never takes the replica down.

The pixels a replica feeds the model are computed exactly as `Captioner.caption_video` computes them offline, so
the same video, parameters and checkpoint give the same caption (tests/test_serving.py checks it).

`build_app(args)` is the Serve `import_path` entry (`stgpt.serving:build_app`, see configs/serve.yaml); with no
checkpoint it serves `outputs/train/best` if training left one there, else a tiny random-init demo checkpoint it
builds once under `outputs/demo/untrained` (stgpt/checkpoints.py).

(No `from __future__ import annotations` here: FastAPI reads the route signatures of the ingress class at run
time. Helpers the deployment calls are defined above it, because Serve pickles the class where it is decorated.)
"""

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve import Application

from stgpt.checkpoints import choose, ensure_demo_checkpoint
from stgpt.config import EncoderConfig, ServeConfig, load_config
from stgpt.isolation import sample_video_isolated
from stgpt.serving_guard import authorized, token_from_env
from stgpt.video import VideoDecodeError, VideoLimitError

logger = logging.getLogger("ray.serve")

GENERATION_PARAMS = ("num_beams", "min_new_tokens", "max_new_tokens")  # what a request may set
APP_ARGS = ("checkpoint", "serve", "generation", "deployment", "precision", "encoder")
DEFAULT_MAX_ONGOING_REQUESTS = 32
UPLOAD_FIELDS = ("video", "file")


# --------------------------------------------------------------------------------------------------------
# Requests and answers.


class RequestError(Exception):
    """A request the deployment refuses: HTTP status, a stable error code and a message for people."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def error_response(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


class CaptionResponse(BaseModel):
    caption: str
    frame_indices: list[int]
    num_source_frames: int
    model: str
    generation: dict[str, int]
    batch_size: int  # requests generated together with this one
    time_s: float
    timings: dict[str, float]


class ErrorResponse(BaseModel):
    error: str
    detail: str


@dataclass
class _Job:
    """One request's model input, on its way through the batch queue."""

    pixel_values: torch.Tensor  # (T, 3, H, W)
    generation: tuple[tuple[str, int], ...]  # sorted items, so equal settings group together


_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["video"],
                    "properties": {"video": {"type": "string", "format": "binary"},
                                   **{name: {"type": "integer"} for name in GENERATION_PARAMS}},
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_ERRORS_DOC = {code: {"model": ErrorResponse, "description": text} for code, text in [
    (400, "empty body, no file, or a malformed multipart body"), (401, "no or wrong bearer token"),
    (413, "upload over max_upload_mb"),
    (422, "not a decodable video, too long, or a generation parameter out of bounds"),
    (504, "took longer than request_timeout_s")]}

app = FastAPI(
    title="stgpt captioning",
    description="SpaceTimeGPT video captioning: upload a video, get a caption. Beam search is batched across "
                "requests on each replica.",
    version="1",
)


@app.exception_handler(RequestValidationError)
async def _invalid_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'request'}: {err['msg']}"
                         for err in exc.errors())
    return error_response(422, "invalid_parameter", problems)


async def _read_multipart(request: Request, body: bytes) -> tuple[bytes, dict[str, str]]:
    """The one uploaded file of a multipart body, and its text fields. Text is never taken for a path."""
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=len(GENERATION_PARAMS) + 1)
    except Exception as exc:  # starlette raises HTTPException / MultiPartException for malformed bodies
        raise RequestError(400, "malformed_multipart", f"cannot parse the multipart body: "
                                                       f"{getattr(exc, 'detail', None) or exc}") from None
    fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    uploads = {key: value for key, value in form.multi_items() if not isinstance(value, str)}
    unknown = sorted((set(fields) - set(GENERATION_PARAMS) - set(UPLOAD_FIELDS))
                     | (set(uploads) - set(UPLOAD_FIELDS)))
    if unknown:
        raise RequestError(422, "invalid_parameter", f"unknown form field(s) {', '.join(unknown)}; "
                                                     f"known: video (the file), {', '.join(GENERATION_PARAMS)}")
    if not uploads:
        named = [key for key in UPLOAD_FIELDS if key in fields]
        reason = (f"the '{named[0]}' field is text, not a file: upload the video's bytes (the server never "
                  f"opens paths named in a request)" if named else "no file in the multipart body (field 'video')")
        raise RequestError(400, "missing_video", reason)
    upload = next(iter(uploads.values()))
    data = await upload.read()
    await form.close()
    if not data:
        raise RequestError(400, "empty_body", f"the uploaded file {upload.filename!r} is empty (0 bytes)")
    return data, {key: value for key, value in fields.items() if key in GENERATION_PARAMS}


# --------------------------------------------------------------------------------------------------------
# The deployment.


@serve.deployment(max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class CaptionDeployment:
    """A replica: one model, a decode thread pool, a batch queue for generation."""

    def __init__(self, checkpoint: str, settings: ServeConfig, generation: Optional[dict[str, Any]] = None,
                 precision: str = "auto", untrained: bool = False, encoder: Optional[EncoderConfig] = None):
        import ray

        from stgpt.inference import Captioner

        if untrained:  # the demo checkpoint: built on the node that chose it; the same is built here if missing
            ensure_demo_checkpoint(checkpoint)
        use_gpu = bool(ray.get_gpu_ids())  # only a GPU Ray gave this replica
        self.captioner = Captioner.from_pretrained(checkpoint, use_gpu=use_gpu, precision=precision, encoder=encoder)
        self.settings = settings
        self.token = settings.auth_token or token_from_env()
        self.max_upload_bytes = settings.max_upload_mb * 1024 * 1024
        # what one upload may cost to decode: the model's video settings, with this deployment's duration limit
        self.video_limits = dataclasses.replace(
            self.captioner.video, max_seconds=min(self.captioner.video.max_seconds, settings.max_video_seconds))
        # Per-request defaults start from the checkpoint's own generation config, as offline generation does.
        saved = self.captioner.model.generation_config
        generation = dict(generation or {})
        self.defaults = {name: int(generation.pop(name, getattr(saved, name))) for name in GENERATION_PARAMS}
        self.fixed_generation = generation  # e.g. length_penalty: the deployment's, not the request's
        self._decode_pool = ThreadPoolExecutor(max(1, settings.decode_threads), thread_name_prefix="decode")
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="generate")
        # Ray's batch loop closes the next batch as soon as the current one is launched, not when it finishes, so
        # requests that arrive while the model is busy would go into small batches closed within
        # batch_wait_timeout_s. They wait here instead, and enter the batch queue together once the model is free.
        self._model_idle = asyncio.Event()
        self._model_idle.set()
        self._generate.set_max_batch_size(settings.max_batch_size)
        self._generate.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        logger.info("serving %s on %s (%s): batches of up to %d, waiting up to %.3fs, defaults %s, torch threads %d",
                    self.captioner.name, self.captioner.device, self.captioner.precision, settings.max_batch_size,
                    settings.batch_wait_timeout_s, self.defaults, torch.get_num_threads())

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        import ray

        return {"status": "ok", "model": self.captioner.name, "device": str(self.captioner.device),
                "replica": ray.get_runtime_context().get_actor_id() or "", "pid": str(os.getpid())}

    @app.post("/caption", response_model=CaptionResponse, responses=_ERRORS_DOC, openapi_extra=_UPLOAD_DOC)
    async def caption(
        self,
        request: Request,
        num_beams: Optional[int] = Query(None, description="beam width (1 to the deployment's max_beams)"),
        min_new_tokens: Optional[int] = Query(None, description="at least this many generated tokens"),
        max_new_tokens: Optional[int] = Query(None, description="at most this many (up to max_new_tokens_limit)"),
    ):
        """Caption one uploaded video: multipart field `video`, or the raw body."""
        start = time.perf_counter()
        query = {"num_beams": num_beams, "min_new_tokens": min_new_tokens, "max_new_tokens": max_new_tokens}
        if not authorized(request.headers.get("authorization"), self.token):  # before any of the body is read
            response = error_response(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>'")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        try:
            unknown = sorted(set(request.query_params) - set(GENERATION_PARAMS))
            if unknown:
                raise RequestError(422, "invalid_parameter", f"unknown parameter(s) {', '.join(unknown)}; "
                                                             f"known: {', '.join(GENERATION_PARAMS)}")
            return await asyncio.wait_for(self._caption(request, query, start), self.settings.request_timeout_s)
        except RequestError as exc:
            return error_response(exc.status, exc.error, exc.detail)
        except asyncio.TimeoutError:
            return error_response(504, "timeout", f"no caption within the deployment's request_timeout_s "
                                                  f"({self.settings.request_timeout_s:g}s); try again later or "
                                                  f"with fewer beams or tokens")
        except Exception:  # a bug, not the request's fault: say so, keep serving
            logger.exception("caption request failed")
            return error_response(500, "internal_error", "the server failed to caption this video; see its log")

    async def _caption(self, request: Request, query: dict[str, Optional[int]], start: float) -> dict[str, Any]:
        data, form_params = await self._read_video_bytes(request)
        generation = self._generation(query, form_params)
        loop = asyncio.get_running_loop()
        deadline = start + self.settings.request_timeout_s
        pixel_values, indices, num_source = await loop.run_in_executor(self._decode_pool, self._prepare, data,
                                                                       deadline)
        decoded = time.perf_counter()
        await self._model_idle.wait()
        result = await self._generate(_Job(pixel_values, tuple(sorted(generation.items()))))
        if isinstance(result, Exception):
            raise result
        text, batch_size = result
        done = time.perf_counter()
        return {"caption": text, "frame_indices": indices, "num_source_frames": num_source,
                "model": self.captioner.name, "generation": generation, "batch_size": batch_size,
                "time_s": round(done - start, 4),
                "timings": {"decode_s": round(decoded - start, 4), "generate_s": round(done - decoded, 4)}}

    async def _read_video_bytes(self, request: Request) -> tuple[bytes, dict[str, str]]:
        """The uploaded bytes (raw body or multipart file) and any generation parameters sent as form fields."""
        limit = self.max_upload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "upload_too_large", f"the request body is {int(declared)} bytes; this "
                                                        f"deployment accepts at most {self.settings.max_upload_mb} MB")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, "upload_too_large", f"the request body is over this deployment's "
                                                            f"{self.settings.max_upload_mb} MB limit")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body:
            raise RequestError(400, "empty_body", "the request has no body: send the video as a multipart upload "
                                                  "(field 'video') or as the raw request body")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return body, {}
        return await _read_multipart(request, body)

    def _generation(self, query: dict[str, Optional[int]], form: dict[str, str]) -> dict[str, int]:
        """The request's beam-search settings, defaults filled in, each checked against the deployment's bounds."""
        values = dict(self.defaults)
        for name in GENERATION_PARAMS:
            if name in form and query[name] is not None:
                raise RequestError(422, "invalid_parameter", f"{name} given both in the query and the form")
            if name in form:
                try:
                    values[name] = int(form[name])
                except ValueError:
                    raise RequestError(422, "invalid_parameter",
                                       f"{name} must be an integer, got {form[name][:40]!r}") from None
            elif query[name] is not None:
                values[name] = query[name]
        limits = self.settings
        if not 1 <= values["num_beams"] <= limits.max_beams:
            raise RequestError(422, "invalid_parameter",
                               f"num_beams must be between 1 and {limits.max_beams}, got {values['num_beams']}")
        if not 1 <= values["max_new_tokens"] <= limits.max_new_tokens_limit:
            raise RequestError(422, "invalid_parameter", f"max_new_tokens must be between 1 and "
                                                         f"{limits.max_new_tokens_limit}, got {values['max_new_tokens']}")
        if not 0 <= values["min_new_tokens"] <= values["max_new_tokens"]:
            raise RequestError(422, "invalid_parameter", f"min_new_tokens must be between 0 and max_new_tokens "
                                                         f"({values['max_new_tokens']}), got {values['min_new_tokens']}")
        return values

    def _prepare(self, data: bytes, deadline: float) -> tuple[torch.Tensor, list[int], int]:
        """Decode (in a child process that may crash, killed at the request's deadline) and preprocess, as
        `Captioner.caption_video` does. Runs in the decode pool."""
        from stgpt.transforms import to_pixel_values

        remaining = deadline - time.perf_counter()
        try:
            sampled = sample_video_isolated(data, self.video_limits, name="upload", timeout_s=remaining)
        except VideoLimitError as exc:
            code = "video_too_long" if exc.limit in ("max_seconds", "max_frames") else "video_over_limit"
            raise RequestError(422, code, f"cannot caption the upload: {exc.reason}") from None
        except VideoDecodeError as exc:
            if remaining < self.video_limits.decode_timeout_s and time.perf_counter() >= deadline:
                raise RequestError(504, "timeout", f"decoding did not finish within the deployment's "
                                                   f"request_timeout_s ({self.settings.request_timeout_s:g}s); "
                                                   f"it was stopped") from None
            raise RequestError(422, "invalid_video", f"cannot decode the upload: {exc.reason}") from None
        pixel_values = to_pixel_values(sampled.frames[None], self.captioner.video)[0]
        return pixel_values, sampled.indices.tolist(), sampled.num_source_frames

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # replaced from the config in __init__
    async def _generate(self, jobs: list[_Job]) -> list[tuple[str, int] | Exception]:
        """Beam search for a batch of requests: one `generate` per distinct setting, in the model thread."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for position, job in enumerate(jobs):
            groups[job.generation].append(position)
        results: list[Any] = [None] * len(jobs)
        loop = asyncio.get_running_loop()
        self._model_idle.clear()
        try:
            for generation, positions in groups.items():
                pixel_values = torch.stack([jobs[p].pixel_values for p in positions])
                try:
                    texts = await loop.run_in_executor(self._model_thread, self._run_model, pixel_values,
                                                       {**self.fixed_generation, **dict(generation)})
                except Exception as exc:  # fail this group's requests only
                    logger.exception("generation failed for a batch of %d", len(positions))
                    texts = [exc] * len(positions)
                for position, text in zip(positions, texts):
                    results[position] = text if isinstance(text, Exception) else (text, len(jobs))
        finally:
            self._model_idle.set()
        return results

    def _run_model(self, pixel_values: torch.Tensor, generation: dict[str, Any]) -> list[str]:
        from stgpt.device import autocast
        from stgpt.model import generate_captions

        captioner = self.captioner
        with autocast(captioner.device, captioner.precision):
            return generate_captions(captioner.caption_model, pixel_values.to(captioner.device), **generation)


# --------------------------------------------------------------------------------------------------------
# Building the application: from a Serve config file's `args`, or from jobs/serve.py.


def build_app(args: Optional[dict[str, Any]] = None) -> Application:
    """The Serve application (`import_path: stgpt.serving:build_app`).

    `args` keys, all optional:
      checkpoint: directory or hub id; empty: outputs/train/best if present, else the tiny demo checkpoint;
      serve: ServeConfig fields (batching, limits, timeout);
      generation: default beam-search settings (else the checkpoint's generation config);
      deployment: Serve deployment options applied in code (`num_replicas`, `autoscaling_config`,
                  `ray_actor_options`, `max_ongoing_requests`, ...). A Serve config file's `deployments:`
                  section does the same and wins over these;
      precision: auto | fp32 | bf16 | fp16;
      encoder: EncoderConfig fields (attention, channels_last, compile; stgpt/encoder.py).
    """
    args = dict(args or {})
    unknown = sorted(set(args) - set(APP_ARGS))
    if unknown:
        raise ValueError(f"unknown app arg(s) {', '.join(unknown)}; known: {', '.join(APP_ARGS)}")
    overrides = [f"serve.{key}={json.dumps(value)}" for key, value in (args.get("serve") or {}).items()]
    overrides += [f"generation.{key}={json.dumps(value)}" for key, value in (args.get("generation") or {}).items()]
    overrides += [f"encoder.{key}={json.dumps(value)}" for key, value in (args.get("encoder") or {}).items()]
    cfg = load_config(None, overrides)  # type-checks every key
    generation = {key: getattr(cfg.generation, key) for key in (args.get("generation") or {})}
    choice = choose(args.get("checkpoint"))
    logger.info("stgpt serving checkpoint %s [%s]", choice.path, choice.origin)
    options = dict(args.get("deployment") or {})
    options.setdefault("max_ongoing_requests", max(DEFAULT_MAX_ONGOING_REQUESTS, 2 * cfg.serve.max_batch_size))
    deployment = CaptionDeployment.options(**options)
    return deployment.bind(choice.path, cfg.serve, generation, args.get("precision", "auto"), choice.untrained,
                           cfg.encoder)


@dataclass
class ServeFile:
    """What jobs/serve.py needs from a Serve config file: one application and the HTTP options."""

    app_args: dict[str, Any]  # build_app args, the file's `deployments:` options folded into `deployment`
    name: str
    route_prefix: str
    http_options: dict[str, Any] = field(default_factory=dict)
    proxy_location: Optional[str] = None


def load_serve_file(path: str | os.PathLike, app_name: Optional[str] = None) -> ServeFile:
    """Read a Serve config file (validated with Serve's own schema) for running its stgpt app with `serve.run`."""
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(Path(path).read_text()) or {}
    schema = ServeDeploySchema.model_validate(raw)
    apps = [a for a in raw.get("applications", []) if app_name in (None, a.get("name"))]
    if len(apps) != 1:
        raise ValueError(f"{path}: expected one application{f' named {app_name!r}' if app_name else ''}, "
                         f"found {len(apps)}")
    spec = apps[0]
    args = dict(spec.get("args") or {})
    deployments = spec.get("deployments") or []
    mine = [d for d in deployments if d.get("name") == CaptionDeployment.name]
    if mine:
        args["deployment"] = {**{k: v for k, v in mine[0].items() if k != "name"}, **(args.get("deployment") or {})}
    http = schema.http_options.model_dump(exclude_unset=True) if "http_options" in raw else {}
    return ServeFile(app_args=args, name=spec.get("name", "default"), route_prefix=spec.get("route_prefix", "/"),
                     http_options=http, proxy_location=raw.get("proxy_location"))

