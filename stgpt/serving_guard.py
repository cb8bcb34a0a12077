"""The HTTP proxy's guard: refuse unauthenticated and oversized uploads before Ray's proxy reads their bodies.

Ray Serve's proxy reads a request body and forwards it to a replica, which is where `CaptionDeployment` enforces
its token and upload limit; by then the body has crossed the proxy. This ASGI middleware runs inside the proxy
(Ray loads it from `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=stgpt.serving_guard:proxy_middlewares`, an
environment variable of the nodes, which `jobs/serve.py` and the cluster manifests set) and answers `POST
.../caption` with 401 when `STGPT_SERVE_TOKEN` is set and the request lacks it, and 413 when the declared
`Content-Length`, or the bytes received so far, pass `STGPT_MAX_UPLOAD_MB`. Other routes (`/healthz`, `/docs`)
pass untouched. What it cannot bound: request headers and the first body chunk, which the proxy's HTTP server
(uvicorn) reads before any application code runs; `http_options.keep_alive_timeout_s` and `request_timeout_s`
bound how long a connection may sit.
"""
from __future__ import annotations

import hmac
import json
import os
from typing import Any, Awaitable, Callable

TOKEN_ENV = "STGPT_SERVE_TOKEN"
MAX_UPLOAD_ENV = "STGPT_MAX_UPLOAD_MB"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "stgpt.serving_guard:proxy_middlewares"
GUARDED_SUFFIX = "/caption"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def token_from_env() -> str | None:
    """The bearer token callers must send, if one is configured (an empty value means none)."""
    return os.environ.get(TOKEN_ENV) or None


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an `Authorization` header carries `token` (always true when no token is configured)."""
    if token is None:
        return True
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


class UploadGuard:
    """ASGI middleware: token and upload-size checks for the caption route, before the body is read."""

    def __init__(self, app, token: str | None = None, max_upload_mb: float | None = None):
        self.app = app
        self.token = token if token is not None else token_from_env()
        limit = max_upload_mb if max_upload_mb is not None else os.environ.get(MAX_UPLOAD_ENV)
        self.max_bytes = int(float(limit) * 1024 * 1024) if limit else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or not scope.get("path", "").rstrip("/").endswith(GUARDED_SUFFIX):
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}
        if not authorized(headers.get("authorization"), self.token):
            return await _answer(send, 401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>'",
                                 [(b"www-authenticate", b"Bearer")])
        declared = headers.get("content-length", "")
        if self.max_bytes is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _answer(send, 413, "upload_too_large", f"the request body is {declared} bytes; this "
                                 f"service accepts at most {self.max_bytes // (1024 * 1024)} MB")
        if self.max_bytes is None:
            return await self.app(scope, receive, send)
        received, refused = 0, False

        async def counted() -> dict:
            nonlocal received, refused
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    return {"type": "http.disconnect"}  # the app stops reading; the guard answers instead
            return message

        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if refused and not started:
                return  # the app's answer to a cut-off body is replaced by the 413 below
            started = started or message.get("type") == "http.response.start"
            await send(message)

        await self.app(scope, counted, tracked_send)
        if refused and not started:
            await _answer(send, 413, "upload_too_large", f"the request body is over this service's "
                                                         f"{self.max_bytes // (1024 * 1024)} MB limit")


async def _answer(send: Send, status: int, error: str, detail: str, extra: list | None = None) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list:
    """What Ray's proxy calls (through `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`): the guard, from the env."""
    from starlette.middleware import Middleware

    return [Middleware(UploadGuard)]
