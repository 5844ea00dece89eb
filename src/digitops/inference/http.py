"""The HTTP edge of the request path: reading uploads and options, building replies, and
mapping every error to a status code and a JSON body that says what to send instead."""

from __future__ import annotations

import base64
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from digitops.inference.errors import ImageError, RequestError
from digitops.inference.forms import read_form
from digitops.inference.preprocess import parse_invert
from digitops.inference.served import ServedModel
from digitops.model import DigitCNN

# How long an idle kept-alive connection stays open (`bentoml serve --timeout-keep-alive`; BentoML
# takes it only on the command line). It must outlast the idle timeout of whatever keeps
# connections to us: with BentoML's 5 s, equal to httpx's pool expiry, a client's next request
# could meet the server closing that connection and fail with a reset (seen under load: 1 in
# 20,000). nginx keeps upstream connections 60 s (deploy/nginx.conf), so we keep them longer.
KEEP_ALIVE_SECONDS = 75
IMAGE_FIELD = "image"
# The options each kind of route takes, as query parameters or form fields.
PREDICT_OPTIONS = ("invert", "noise", "seed", "log")
EXPLAIN_OPTIONS = ("invert", "noise", "seed", "target")
FEATURE_MAP_OPTIONS = ("invert", "noise", "seed", "layer", "arrays")
FEEDBACK_IMAGE_FIELDS = ("invert", "noise", "seed", "label", "comment")
BATCH_FIELD = "images"
MAX_BATCH_IMAGES = 256  # per /predict_batch call
MAX_CLASSIFY_IMAGES = 64  # per `classify` call: one batch of the model
# Room for multipart boundaries and headers on top of the files themselves.
MULTIPART_OVERHEAD = 65536
SEND_INSTEAD = (
    f"send a PNG/JPEG/WebP/BMP/GIF as multipart form field '{IMAGE_FIELD}', "
    "or as the raw request body with an image/* Content-Type"
)


# Where the service's own OpenAPI document is served; /docs.json is routed there.
OPENAPI_PATH = "/openapi.json"


# Errors.
def error_reply(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure the app can meet answers `{"error", "status"}` with its status code."""

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return error_reply(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
            for e in exc.errors()
        )
        return error_reply(400, f"invalid request parameters: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such endpoint; see /docs" if exc.status_code == 404 else str(exc.detail)
        if exc.status_code == 405:
            message = f"method {request.method} not allowed; allowed: {exc.headers.get('Allow')}"
        return error_reply(exc.status_code, message, exc.headers)  # keeps 405's Allow header


class JSONOnly:
    """ASGI middleware: POSTs to `paths` (BentoML's own APIs, which parse their bodies before
    our code runs) must be JSON; anything else gets a 415 instead of a parser's 500."""

    def __init__(self, app, paths: tuple[str, ...]):
        self.app, self.paths = app, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            headers = dict(scope["headers"])
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if content_type != b"application/json":
                reply = error_reply(415, 'send a JSON body: {"pixels": [[[0-255, ...]]]}')
                return await reply(scope, receive, send)
        await self.app(scope, receive, send)


class OwnOpenAPI:
    """ASGI middleware: GET /docs.json gets the service's own contract, not BentoML's."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/docs.json":
            scope = {**scope, "path": OPENAPI_PATH, "raw_path": OPENAPI_PATH.encode()}
        await self.app(scope, receive, send)


# Requests.
def _refuse_declared_size(request: Request, limit: int) -> None:
    """413 before reading a byte when the client already says the body is too big."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ImageError(f"upload of {int(declared)} bytes is over the {limit}-byte limit", 413)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes `limit` (never buffered whole)."""
    _refuse_declared_size(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ImageError(f"upload is over the {limit}-byte limit", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(request: Request, limit: int, field: str) -> tuple[list[bytes], dict]:
    """Image bytes and string options from multipart form fields, or a raw body + query."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    options = dict(request.query_params)
    if content_type == "multipart/form-data":
        # A body declared too big for its files is refused before a byte of it is read.
        files_allowed = MAX_BATCH_IMAGES if field == BATCH_FIELD else 1
        _refuse_declared_size(request, limit * files_allowed + MULTIPART_OVERHEAD)
        form = await read_form(
            request.headers["content-type"],
            request.stream(),
            max_files=MAX_BATCH_IMAGES,
            max_fields=64,
            max_file_bytes=limit,
        )
        files = [f.data for f in form.files if f.name in (field, IMAGE_FIELD)]
        for key, value in form.fields:
            if options.get(key, value) != value:  # which one did the client mean?
                raise RequestError(f"option '{key}' sent twice with different values")
            options[key] = value
        if not files:
            got = sorted({name for name, _ in form.fields} | {f.name for f in form.files})
            raise RequestError(
                f"no file in form field '{field}' (got {got or 'no fields'}); {SEND_INSTEAD}"
            )
        if field == IMAGE_FIELD and len(files) > 1:
            raise RequestError(
                f"{len(files)} files sent; send one image here, or many to /predict_batch"
            )
        return files, options
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return [await read_body(request, limit)], options
    if not content_type and not request.headers.get("content-length", "").strip("0"):
        raise RequestError(f"empty request; {SEND_INSTEAD}")
    raise ImageError(f"unsupported Content-Type {content_type or '(none)'!r}; {SEND_INSTEAD}", 415)


@dataclass(frozen=True)
class Options:
    invert: bool | None = None
    noise: float = 0.0
    seed: int | None = None
    target: int | None = None
    layer: str = "conv1"
    arrays: bool = False
    log: bool = True  # the web page sends false for previews while a stroke is still drawn


def _parse_float(name: str, value: str, lo: float, hi: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise RequestError(
            f"'{name}' must be a number in [{lo:g}, {hi:g}], got {value!r}"
        ) from None
    if not lo <= number <= hi or np.isnan(number):
        raise RequestError(f"'{name}' must be in [{lo:g}, {hi:g}], got {value!r}")
    return number


def _parse_int(name: str, value: str, lo: int, hi: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise RequestError(f"'{name}' must be an integer in [{lo}, {hi}], got {value!r}") from None
    if not lo <= number <= hi:
        raise RequestError(f"'{name}' must be in [{lo}, {hi}], got {value!r}")
    return number


def parse_options(raw: dict[str, str], allowed: tuple[str, ...]) -> Options:
    """Validate request options (form fields or query parameters) against the route's `allowed`
    names; an unknown name is refused, since a misspelt option silently ignored is a wrong
    answer the client cannot see."""
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise RequestError(
            f"unknown option {unknown[0]!r}; this endpoint takes {', '.join(allowed)}"
        )
    kwargs: dict = {}
    if (value := raw.get("invert")) not in (None, ""):
        kwargs["invert"] = parse_invert(value)
    if (value := raw.get("noise")) not in (None, ""):
        kwargs["noise"] = _parse_float("noise", value, 0.0, 1.0)
    if (value := raw.get("seed")) not in (None, ""):
        kwargs["seed"] = _parse_int("seed", value, 0, 2**32 - 1)
    if (value := raw.get("target")) not in (None, ""):
        kwargs["target"] = _parse_int("target", value, 0, 9)
    if (value := raw.get("layer")) not in (None, ""):
        if value not in DigitCNN.conv_layers:
            layers = ", ".join(DigitCNN.conv_layers)
            raise RequestError(f"'layer' must be one of {layers}, got {value!r}")
        kwargs["layer"] = value
    for flag in ("arrays", "log"):
        if (value := raw.get(flag)) not in (None, ""):
            kwargs[flag] = value.lower() in ("1", "true", "yes", "on")
    return Options(**kwargs)


def parse_feedback(body: dict) -> tuple[str, int, str | None]:
    """(prediction_id, label, comment) from a /feedback JSON body, or RequestError(400)."""
    if not isinstance(body, dict):
        raise RequestError('send a JSON object: {"prediction_id": "...", "label": 0-9}')
    prediction_id = body.get("prediction_id")
    if not isinstance(prediction_id, str) or not prediction_id:
        raise RequestError("'prediction_id' (string, from a /predict reply) is required")
    label = body.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 9:
        raise RequestError(f"'label' must be an integer digit 0-9, got {label!r}")
    comment = body.get("comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > 1000):
        raise RequestError("'comment' must be a string of at most 1000 characters")
    return prediction_id, label, comment


def pixel_array(value: object) -> np.ndarray:
    """Pixels of the `classify` API: nested lists of numbers 0-255 shaped [N, 28, 28].

    Checked per request, before BentoML batches requests together, so a bad call gets a 400 of
    its own (numpy alone would turn an object into a 0-d array, and fail the whole batch)."""
    if not isinstance(value, list | np.ndarray):
        raise ValueError(f"pixels must be a list of 28x28 lists, got {type(value).__name__}")
    try:
        pixels = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"pixels must be nested lists of numbers: {err}") from None
    if pixels.shape == (0,):
        pixels = pixels.reshape(0, 28, 28)  # no images is a batch of none
    if pixels.ndim != 3 or pixels.shape[1:] != (28, 28):
        raise ValueError(f"pixels must be [N, 28, 28], got {list(pixels.shape)}")
    if len(pixels) > MAX_CLASSIFY_IMAGES:
        raise ValueError(f"at most {MAX_CLASSIFY_IMAGES} images per call, got {len(pixels)}")
    if pixels.size and not (np.isfinite(pixels).all() and 0 <= pixels.min() <= pixels.max() <= 255):
        raise ValueError("pixels must be numbers from 0 (background) to 255 (ink)")
    return pixels


class RateLimiter:
    """At most `limit` events per `window` seconds per client (sliding window, in memory)."""

    def __init__(self, limit: int, window: float = 60.0):
        self.limit, self.window = limit, window
        self._events: dict[str, list[float]] = {}

    def allow(self, client: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        recent = [t for t in self._events.get(client, []) if now - t < self.window]
        allowed = len(recent) < self.limit
        if allowed:
            recent.append(now)
        self._events[client] = recent
        if len(self._events) > 10_000:  # forget idle clients so memory stays bounded
            self._events = {
                c: ts for c, ts in self._events.items() if ts and now - ts[-1] < self.window
            }
        return allowed


# Replies.
def json_reply(payload: dict) -> Response:
    """A JSON reply encoded by orjson: a tenth of json.dumps's time on a Grad-CAM's 784
    floats (0.03 against 0.33 ms)."""
    return Response(orjson.dumps(payload), media_type="application/json")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def new_prediction_id() -> str:
    """32 hex digits: the time in milliseconds, then 80 random bits. Time-ordered (as a UUIDv7)
    so that a prediction's age can be read from its id (`prediction_age`)."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def prediction_age(prediction_id: str) -> float:
    """Seconds since `new_prediction_id` made `prediction_id`; infinite for any other string."""
    try:
        made = int(prediction_id[:12], 16) / 1000 if len(prediction_id) == 32 else None
    except ValueError:
        made = None
    return math.inf if made is None else time.time() - made


def prediction_payload(
    probabilities: Sequence[float],
    input_png: bytes,
    inverted: bool,
    served: ServedModel,
    prediction_id: str | None,
) -> dict:
    """The JSON of a prediction; without `prediction_id` when it is not logged for feedback.
    `probabilities` are Python floats (`ndarray.tolist()`), as `PredictionStore.record` takes."""
    p = probabilities
    digit = max(range(len(p)), key=p.__getitem__)
    payload = {
        "digit": digit,
        "confidence": round(p[digit], 6),
        "probabilities": [round(x, 6) for x in p],
        "inverted": bool(inverted),
        "input_png": b64(input_png),
        "prediction_id": prediction_id,
        "model": served.identity(),
    }
    if prediction_id is None:
        del payload["prediction_id"]
    return payload
