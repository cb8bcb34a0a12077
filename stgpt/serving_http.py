"""The caption service's HTTP layer: the FastAPI app, request parsing and checking, and every error answer.

A request's parts are read here, before any model work: the bearer token (`unauthorized`), the body under the
size cap (`read_upload`: raw or one multipart file; a text field is never taken for a path), and the generation
parameters (`generation_params`: query or form, checked against the deployment's bounds). Every refusal is a
`RequestError`, answered as `{"error": code, "detail": message}` (`error_response`). The deployment
(stgpt/serving_deployment.py) declares its routes on `app`.

(No `from __future__ import annotations`: FastAPI and pydantic read these signatures at run time.)
"""
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from stgpt.config import ServeConfig

GENERATION_PARAMS = ("num_beams", "min_new_tokens", "max_new_tokens")  # what a request may set
UPLOAD_FIELDS = ("video", "file")


class RequestError(Exception):
    """A request the deployment refuses: HTTP status, a stable error code and a message for people."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


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


def error_response(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def unauthorized() -> JSONResponse:
    response = error_response(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>'")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


# OpenAPI: the body and the error answers of /caption, which FastAPI cannot infer from a raw-request route.
UPLOAD_DOC = {
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
ERRORS_DOC = {code: {"model": ErrorResponse, "description": text} for code, text in [
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


def check_query(request: Request) -> None:
    """Refuse query parameters other than the generation ones (a `path=` is never opened)."""
    unknown = sorted(set(request.query_params) - set(GENERATION_PARAMS))
    if unknown:
        raise RequestError(422, "invalid_parameter", f"unknown parameter(s) {', '.join(unknown)}; "
                                                     f"known: {', '.join(GENERATION_PARAMS)}")


async def read_upload(request: Request, max_upload_mb: int) -> tuple[bytes, dict[str, str]]:
    """The uploaded bytes (raw body or multipart file) and any generation parameters sent as form fields; 413
    as soon as the declared or received size passes `max_upload_mb`."""
    limit = max_upload_mb * 1024 * 1024
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "upload_too_large", f"the request body is {int(declared)} bytes; this "
                                                    f"deployment accepts at most {max_upload_mb} MB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "upload_too_large", f"the request body is over this deployment's "
                                                        f"{max_upload_mb} MB limit")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise RequestError(400, "empty_body", "the request has no body: send the video as a multipart upload "
                                              "(field 'video') or as the raw request body")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body, {}
    return await _read_multipart(request, body)


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


def generation_params(query: dict[str, Optional[int]], form: dict[str, str], defaults: dict[str, int],
                      limits: ServeConfig) -> dict[str, int]:
    """The request's beam-search settings, `defaults` filled in, each checked against the deployment's bounds."""
    values = dict(defaults)
    for name in GENERATION_PARAMS:
        if name in form and query.get(name) is not None:
            raise RequestError(422, "invalid_parameter", f"{name} given both in the query and the form")
        if name in form:
            try:
                values[name] = int(form[name])
            except ValueError:
                raise RequestError(422, "invalid_parameter",
                                   f"{name} must be an integer, got {form[name][:40]!r}") from None
        elif query.get(name) is not None:
            values[name] = query[name]
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
