"""One caption replica: the model, a decode pool, the idle gate and beam search batched across requests.

Each upload decodes in a child process (`stgpt.isolation`) killed at the request's deadline, waited on from a
small thread pool so the event loop keeps accepting; a bad upload costs one answer, never the replica. Decoded
requests enter `@serve.batch` only while the model is idle: Ray closes the next batch as soon as one starts, so
requests arriving mid-generation would otherwise form small early batches. Pixels are computed as
`Captioner.caption_video` computes them, so served and offline captions agree. LIVE_SETTINGS come through Serve's
`user_config`: `reconfigure` applies them at start and on each `serve deploy` that changes them, no restart.

(No `from __future__ import annotations`: FastAPI reads the route signatures of the ingress class at run time.)
"""
import asyncio
import dataclasses
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import ray
import torch
from fastapi import Query, Request
from pydantic import TypeAdapter, ValidationError
from ray import serve

from stgpt.checkpoints import ensure_demo_checkpoint
from stgpt.config import ConfigError, EncoderConfig, ServeConfig
from stgpt.device import autocast
from stgpt.inference import Captioner
from stgpt.isolation import sample_video_isolated
from stgpt.model import generate_captions
from stgpt.serving_guard import authorized, token_from_env
from stgpt.serving_http import (ERRORS_DOC, GENERATION_PARAMS, UPLOAD_DOC, CaptionResponse, RequestError, app,
                                check_query, error_response, generation_params, read_upload, unauthorized)
from stgpt.transforms import to_pixel_values
from stgpt.video import VideoDecodeError, VideoLimitError

logger = logging.getLogger("ray.serve")

# What `user_config` may change on a running replica. The others size things made at start (the decode pool, the
# proxy guard's upload limit, the token, Serve's queue) and change with a redeploy of the app's args.
LIVE_SETTINGS = ("max_batch_size", "batch_wait_timeout_s", "request_timeout_s", "max_video_seconds", "max_beams",
                 "max_new_tokens_limit")


def live_settings(base: ServeConfig, user_config: Optional[dict[str, Any]]) -> ServeConfig:
    """`base` with the deployment's `user_config` applied: live keys only, each type-checked (ConfigError)."""
    user_config = dict(user_config or {})
    fixed = sorted(set(user_config) - set(LIVE_SETTINGS))
    if fixed:
        raise ConfigError(f"user_config key(s) {', '.join(fixed)} cannot change on a running replica; user_config "
                          f"takes {', '.join(LIVE_SETTINGS)} (set the others in the app's args.serve)")
    try:
        return TypeAdapter(ServeConfig).validate_python({**dataclasses.asdict(base), **user_config})
    except ValidationError as exc:
        problems = "; ".join(f"user_config.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(problems) from None


@dataclass
class _Job:
    """One request's model input, on its way through the batch queue."""

    pixel_values: torch.Tensor  # (T, 3, H, W)
    generation: tuple[tuple[str, int], ...]  # sorted items, so equal settings group together


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class CaptionDeployment:
    """A replica: one model, a decode thread pool, a batch queue for generation."""

    def __init__(self, checkpoint: str, settings: ServeConfig, generation: Optional[dict[str, Any]] = None,
                 precision: str = "auto", untrained: bool = False, encoder: Optional[EncoderConfig] = None):
        if untrained:  # the demo checkpoint: built on the node that chose it; the same is built here if missing
            ensure_demo_checkpoint(checkpoint)
        use_gpu = bool(ray.get_gpu_ids())  # only a GPU Ray gave this replica
        self.captioner = Captioner.from_pretrained(checkpoint, use_gpu=use_gpu, precision=precision, encoder=encoder)
        self.base_settings = settings
        self.token = settings.auth_token or token_from_env()
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
        self.reconfigure({})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply the live settings (Serve calls this after `__init__` and on each change of `user_config`)."""
        settings = live_settings(self.base_settings, user_config)
        video = self.captioner.video  # what one upload may cost to decode: the model's, this duration limit
        self.video_limits = dataclasses.replace(video, max_seconds=min(video.max_seconds, settings.max_video_seconds))
        self._generate.set_max_batch_size(settings.max_batch_size)
        self._generate.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.settings = settings  # last: a request reads one version of the settings
        logger.info("serving %s on %s (%s): batches of up to %d, waiting up to %.3fs, defaults %s, torch threads %d",
                    self.captioner.name, self.captioner.device, self.captioner.precision, settings.max_batch_size,
                    settings.batch_wait_timeout_s, self.defaults, torch.get_num_threads())

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.captioner.name, "device": str(self.captioner.device),
                "replica": ray.get_runtime_context().get_actor_id() or "", "pid": str(os.getpid())}

    @app.post("/caption", response_model=CaptionResponse, responses=ERRORS_DOC, openapi_extra=UPLOAD_DOC)
    async def caption(
        self,
        request: Request,
        num_beams: Optional[int] = Query(None, description="beam width (1 to the deployment's max_beams)"),
        min_new_tokens: Optional[int] = Query(None, description="at least this many generated tokens"),
        max_new_tokens: Optional[int] = Query(None, description="at most this many (up to max_new_tokens_limit)"),
    ):
        """Caption one uploaded video: multipart field `video`, or the raw body."""
        start = time.perf_counter()
        settings = self.settings
        if not authorized(request.headers.get("authorization"), self.token):  # before any of the body is read
            return unauthorized()
        query = {"num_beams": num_beams, "min_new_tokens": min_new_tokens, "max_new_tokens": max_new_tokens}
        try:
            check_query(request)
            return await asyncio.wait_for(self._caption(request, query, settings, start), settings.request_timeout_s)
        except RequestError as exc:
            return error_response(exc.status, exc.error, exc.detail)
        except asyncio.TimeoutError:
            return error_response(504, "timeout", f"no caption within the deployment's request_timeout_s "
                                                  f"({settings.request_timeout_s:g}s); try again later or "
                                                  f"with fewer beams or tokens")
        except Exception:  # a bug, not the request's fault: say so, keep serving
            logger.exception("caption request failed")
            return error_response(500, "internal_error", "the server failed to caption this video; see its log")

    async def _caption(self, request: Request, query: dict[str, Optional[int]], settings: ServeConfig,
                       start: float) -> dict[str, Any]:
        data, form_params = await read_upload(request, self.base_settings.max_upload_mb)
        generation = generation_params(query, form_params, self.defaults, settings)
        loop = asyncio.get_running_loop()
        deadline = start + settings.request_timeout_s
        pixel_values, indices, num_source = await loop.run_in_executor(self._decode_pool, self._prepare, data,
                                                                       deadline, settings)
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

    def _prepare(self, data: bytes, deadline: float, settings: ServeConfig) -> tuple[torch.Tensor, list[int], int]:
        """Decode (in a child process that may crash, killed at the request's deadline) and preprocess, as
        `Captioner.caption_video` does. Runs in the decode pool."""
        limits = self.video_limits
        remaining = deadline - time.perf_counter()
        try:
            sampled = sample_video_isolated(data, limits, name="upload", timeout_s=remaining)
        except VideoLimitError as exc:
            code = "video_too_long" if exc.limit in ("max_seconds", "max_frames") else "video_over_limit"
            raise RequestError(422, code, f"cannot caption the upload: {exc.reason}") from None
        except VideoDecodeError as exc:
            if remaining < limits.decode_timeout_s and time.perf_counter() >= deadline:
                raise RequestError(504, "timeout", f"decoding did not finish within the deployment's "
                                                   f"request_timeout_s ({settings.request_timeout_s:g}s); "
                                                   f"it was stopped") from None
            raise RequestError(422, "invalid_video", f"cannot decode the upload: {exc.reason}") from None
        pixel_values = to_pixel_values(sampled.frames[None], self.captioner.video)[0]
        return pixel_values, sampled.indices.tolist(), sampled.num_source_frames

    @serve.batch(max_batch_size=ServeConfig.max_batch_size, batch_wait_timeout_s=ServeConfig.batch_wait_timeout_s)
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
        captioner = self.captioner
        with autocast(captioner.device, captioner.precision):
            return generate_captions(captioner.caption_model, pixel_values.to(captioner.device), **generation)
