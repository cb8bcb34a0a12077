"""Caption a video with a running stgpt deployment: `caption("clip.mp4", url="http://host:8000")`.

The video's bytes are uploaded (multipart field `video`); the server never opens a path named in a request, so
the file only has to exist where the client runs. A deployment that requires a token gets it from `token`, or
from `$STGPT_SERVE_TOKEN` (the variable the server reads too).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class CaptionRequestError(RuntimeError):
    """The server refused or failed the request: its HTTP status, error code and message."""

    def __init__(self, status_code: int, error: str, detail: str):
        super().__init__(f"HTTP {status_code} {error}: {detail}")
        self.status_code, self.error, self.detail = status_code, error, detail


def caption_url(url: str) -> str:
    """The /caption endpoint under a deployment's base URL (a URL already ending in /caption is kept)."""
    url = url.rstrip("/")
    return url if url.endswith("/caption") else f"{url}/caption"


def caption(
    video: str | os.PathLike | bytes,
    url: str = DEFAULT_URL,
    *,
    num_beams: Optional[int] = None,
    min_new_tokens: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    timeout_s: float = 120.0,
    client: Optional[httpx.Client] = None,
    token: Optional[str] = None,
) -> dict[str, Any]:
    """POST one video to `url` and return the server's JSON answer (`caption`, `frame_indices`, `model`, ...).

    Raises `CaptionRequestError` when the server answers an error, and httpx's errors when it cannot be reached.
    """
    if isinstance(video, (bytes, bytearray, memoryview)):
        name, data = "video.mp4", bytes(video)
    else:
        name, data = Path(video).name, Path(video).read_bytes()
    params = {key: value for key, value in (("num_beams", num_beams), ("min_new_tokens", min_new_tokens),
                                            ("max_new_tokens", max_new_tokens)) if value is not None}
    token = token or os.environ.get("STGPT_SERVE_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    own = client is None
    client = client or httpx.Client(timeout=timeout_s)
    try:
        response = client.post(caption_url(url), params=params, headers=headers,
                               files={"video": (name, data, "application/octet-stream")})
    finally:
        if own:
            client.close()
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict) or "caption" not in body:
        error = body.get("error", "http_error") if isinstance(body, dict) else "http_error"
        detail = body.get("detail", response.text[:500]) if isinstance(body, dict) else response.text[:500]
        raise CaptionRequestError(response.status_code, str(error), str(detail))
    return body
