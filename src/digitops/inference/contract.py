"""The service's published contract: what every route takes and answers, and the limits a
client must keep. FastAPI derives the OpenAPI document (/docs.json) from these models."""

from __future__ import annotations

import hmac
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from digitops import __version__
from digitops.data import feedback
from digitops.inference.errors import RequestError, error_reply
from digitops.inference.preprocess import INVERT_WORDS, Options
from digitops.inference.store import STRATEGIES
from digitops.model import DigitCNN

MAX_BATCH_IMAGES = 256  # per /predict_batch call
MAX_CLASSIFY_IMAGES = 64  # per `classify` call: one batch of the model
MAX_FIELD_BYTES = 64 * 1024  # a text field holds an option or a comment: far below this
# Room for multipart boundaries and text fields on top of the files themselves.
MULTIPART_OVERHEAD = 65536
# Where the service's own OpenAPI document is served; /docs.json is routed there.
OPENAPI_PATH = "/openapi.json"

REF_TEMPLATE = "#/components/schemas/{model}"
DESCRIPTION = """\
Reads a handwritten digit from a drawing or a photo and says which digit it is, how sure it is
(all ten probabilities, calibrated), whether the input looks like a digit at all (`is_digit`),
what the model saw (the 28x28 input) and where it looked (Grad-CAM). Corrections sent to
`/feedback` become training data; `/review_queue` lists the predictions the model is least sure
of, and the inputs it judged not a digit.

Images go in as multipart form field `image` (PNG, JPEG, WebP, BMP, GIF or TIFF), and options
as form fields beside it. Every error is JSON `{"error": ..., "status": ...}` that says what was
wrong and what to send instead.
"""


def _not_a_bool(value: object) -> object:
    if isinstance(value, bool):  # pydantic would read true as 1
        raise ValueError("must be a digit 0-9, not a boolean")
    return value


def _true_or_false(value: object) -> object:
    if isinstance(value, str) and value.lower() not in ("true", "false"):
        raise ValueError("must be true or false")  # as the document says: a boolean
    return value


Flag = Annotated[bool, BeforeValidator(_true_or_false)]
NOT_A_DIGIT_WORD = "not-a-digit"
Label = Annotated[
    Annotated[int, Field(ge=0, le=9)] | Literal[NOT_A_DIGIT_WORD],
    BeforeValidator(_not_a_bool),
    Field(description=f'the digit it really is, or "{NOT_A_DIGIT_WORD}"'),
]


def stored_label(label: int | str) -> int:
    """A label as the store keeps it (feedback.NOT_A_DIGIT for "not-a-digit")."""
    return feedback.NOT_A_DIGIT if label == NOT_A_DIGIT_WORD else int(label)


def feedback_reply(result: dict) -> dict:
    """The store's account of a label, with "not a digit" spelt as the request spells it."""
    for key in ("label", "previous_label"):
        if result.get(key) == feedback.NOT_A_DIGIT:
            result[key] = NOT_A_DIGIT_WORD
    return result


# Requests: one form per kind of route. An unknown field is refused: a misspelt option would
# be silently ignored otherwise.
class ImageForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    invert: Literal[tuple(INVERT_WORDS)] = Field(  # type: ignore[valid-type]
        "auto", description="auto: decide from the image; true/false: force"
    )
    noise: float = Field(0.0, ge=0, le=1, description="stress test: Gaussian noise")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="noise seed")

    def options(self) -> Options:
        return Options(INVERT_WORDS[self.invert], self.noise, self.seed)


class PredictForm(ImageForm):
    image: UploadFile = Field(description="PNG, JPEG, WebP, BMP, GIF or TIFF")
    log: Flag = Field(True, description="false: do not store for feedback (previews)")


class BatchForm(ImageForm):
    images: list[UploadFile] = Field(min_length=1, max_length=MAX_BATCH_IMAGES)
    log: Flag = Field(True, description="false: do not store for feedback")


class ExplainForm(ImageForm):
    image: UploadFile
    target: int | None = Field(None, ge=0, le=9, description="class to explain")


class FeatureMapsForm(ImageForm):
    image: UploadFile
    layer: Literal[DigitCNN.conv_layers] = Field("conv1", description="conv block")  # type: ignore[valid-type]
    arrays: Flag = Field(False, description="also return the raw activations")


class FeedbackRequest(BaseModel):
    prediction_id: str = Field(min_length=1, description="from a /predict reply")
    label: Label
    comment: str | None = Field(None, max_length=1000)


class LabelledImage(ImageForm):
    """Feedback on an image that never went through /predict: it is predicted and logged first."""

    image: UploadFile
    label: Label
    comment: str | None = Field(None, max_length=1000)


# Replies.
class Error(BaseModel):
    """Every 4xx/5xx of the HTTP routes."""

    error: str = Field(description="what was wrong and what to send instead")
    status: int = Field(ge=400, le=599, description="the HTTP status, repeated")


class ClassifyError(BaseModel):
    """BentoML's own error body, answered by the `classify` API."""

    error: str
    detail: list[dict[str, Any]] | None = None


class ModelIdentity(BaseModel):
    name: str
    version: str | None = Field(description="registry version; null for the shipped model")
    mlflow_run_id: str | None
    data_version: str | None = Field(description="the DVC md5 of the data it was trained on")


Probabilities = list[float]


class Answer(BaseModel):
    digit: int = Field(ge=0, le=9, description="the likeliest digit, even when is_digit is false")
    confidence: float = Field(
        ge=0, le=1, description="calibrated: of answers given with 90%, about 90% are right"
    )
    probabilities: Probabilities = Field(min_length=10, max_length=10)
    is_digit: bool = Field(
        description="false when the input looks like no digit the model was trained on "
        "(a letter, a scribble, a blank page): the answer then means little"
    )
    digit_score: float = Field(
        ge=0,
        le=1,
        description="how much the input looks like a digit: the share of validation digits "
        "that look less like one; is_digit is digit_score >= the model's digit_threshold",
    )
    inverted: bool = Field(description="whether dark ink on a light background was inverted")
    input_png: str = Field(description="base64 PNG of the 28x28 input the model saw")
    model: ModelIdentity


class Prediction(Answer):
    prediction_id: str = Field(description="send it back to /feedback to correct the answer")
    logged: Literal[False] | None = Field(
        None, description="present (false) when the prediction was not stored for feedback"
    )


class Explanation(Answer):
    target: int = Field(ge=0, le=9, description="the class the heatmap explains")
    layer: Literal["conv3"]
    cam: list[list[float]] = Field(description="28x28 Grad-CAM heatmap in [0, 1]")
    overlay_png: str = Field(
        description="base64 PNG: the heatmap over the 28x28 input, at 28x28 like input_png "
        "(enlarge it with nearest-neighbour scaling to view it)"
    )


class FeatureMaps(BaseModel):
    layer: Literal[DigitCNN.conv_layers]  # type: ignore[valid-type]
    channels: int
    size: list[int] = Field(min_length=2, max_length=2)
    grid_png: str = Field(description="base64 PNG: every channel, tiled")
    inverted: bool
    maps: list[list[list[float]]] | None = Field(None, description="with arrays=true")


class BatchPredictions(BaseModel):
    results: list[Prediction | Error] = Field(description="one per image, in order")
    count: int


class FeedbackAccepted(BaseModel):
    feedback_id: str
    prediction_id: str
    label: Label
    status: Literal["pending", "ingested", "merged", "rejected"]
    replaced: bool = Field(description="true when this label replaced an earlier one")
    previous_label: Label | None = None


class ReviewItem(BaseModel):
    prediction_id: str
    created_at: float
    digit: int = Field(ge=0, le=9)
    confidence: float
    probabilities: Probabilities
    entropy: float
    margin: float
    digit_score: float | None = Field(description="null for predictions logged before it existed")
    input_png: str


Strategy = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]
Queue = Literal["digits", NOT_A_DIGIT_WORD]


class ReviewQueue(BaseModel):
    queue: Queue
    strategy: Strategy
    k: int
    items: list[ReviewItem]


class FeedbackStats(BaseModel):
    pending: int
    ingested: int
    rejected: int
    predictions: int


class ModelCard(ModelIdentity):
    source: str
    test_accuracy: float | None
    trained_at: str | None
    git_commit: str | None
    model_args: dict[str, Any] | None
    mlflow_tracking_uri: str | None
    temperature: float = Field(description="the calibration: logits are divided by it")
    digit_threshold: float = Field(description="the least digit_score of an input taken as a digit")
    mlflow_ui_url: str | None = None


class Reloaded(BaseModel):
    previous: ModelCard
    current: ModelCard
    workers: int


class Measured(BaseModel):
    accuracy: float | None = Field(description="share of labelled answers that were right")
    low: float | None = Field(description="95% Wilson interval")
    high: float | None
    expected: float | None = Field(description="mean calibrated confidence of the same answers")
    labels: int = Field(description="feedback labels on answered digits behind it")


class MonitorFigures(BaseModel):
    predictions: int = Field(description="answered, stress tests (noise) left out")
    answered: int = Field(description="of them, taken as digits")
    not_digit_share: float | None
    low_confidence_share: float | None = Field(description="of the answered digits")
    inverted_share: float | None = Field(description="dark ink on light, inverted")
    estimated_accuracy: float | None = Field(description="mean calibrated confidence, no labels")
    measured: Measured
    confidence: list[float] = Field(description="shares of 10 equal confidence bins of [0, 1]")
    digits: list[float] = Field(description="shares of each answered digit")
    stats: dict[str, float | None] = Field(description="means of ink, stroke, brightness")


class MonitorBucket(MonitorFigures):
    start: str


class MonitorVersion(MonitorFigures):
    version: str
    serving: bool
    buckets: list[MonitorBucket] = Field(description="the buckets with traffic or labels")


class EmbeddingDrift(BaseModel):
    score: float = Field(description="MMD^2 against the training reference")
    p_value: float


class StatDrift(BaseModel):
    mean: float
    reference_mean: float
    distance: float = Field(description="Kolmogorov-Smirnov distance")
    p_value: float
    shifted: bool


class Drift(BaseModel):
    inputs: int = Field(description="the newest inputs tested")
    embedding: EmbeddingDrift
    stats: dict[str, StatDrift]


class MonitorReference(BaseModel):
    estimated_accuracy: float
    not_digit_share: float
    low_confidence_share: float
    confidence: list[float]
    digits: list[float]
    stats: dict[str, float]
    size: int = Field(description="validation inputs it was fitted on")


class Monitor(BaseModel):
    generated_at: str
    hours: float
    bucket_minutes: int
    model: ModelIdentity
    headline: str
    status: Literal["ok", "warning"]
    drifted: bool
    warnings: list[str]
    thresholds: dict[str, float]
    reference: MonitorReference | None = Field(description="null: the model has none")
    drift: Drift | None = Field(description="null: too few recent inputs, or no reference")
    versions: list[MonitorVersion]


def ref(model: str) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(model=model)}


def json_content(schema: dict) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


# What each kind of route can answer besides its success body.
ERROR_MEANINGS = {
    400: "bad request: unreadable image, malformed body, or an option out of range",
    401: "missing or wrong admin token",
    403: "the operation is disabled on this server",
    404: "no such prediction (or endpoint)",
    413: "upload over the size limit",
    415: "not an image type this service reads",
    429: "too many requests from this client; retry after a minute",
    503: "busy or a dependency (the prediction store, the model store) is unavailable",
}


def route(operation_id: str, reply: type[BaseModel], *statuses: int, **more) -> dict[str, Any]:
    """A route's operation: its success body, and its errors (503 is always possible)."""
    responses = {s: {"model": Error, "description": ERROR_MEANINGS[s]} for s in (*statuses, 503)}
    return {"operation_id": operation_id, "responses": {200: {"model": reply}, **responses}, **more}


PREDICT = route("predict", Prediction, 400, 413, 415)
# A prediction's id is what /feedback needs: the link lets clients (and the fuzzer) follow it.
PREDICT["responses"][200]["links"] = {
    "CorrectIt": {
        "operationId": "feedback",
        "requestBody": {"prediction_id": "$response.body#/prediction_id", "label": 7},
        "description": "say which digit it really was",
    }
}
PREDICT_BATCH = route("predict_batch", BatchPredictions, 400, 413, 415)
EXPLAIN = route("explain", Explanation, 400, 413, 415)
FEATURE_MAPS = route("feature_maps", FeatureMaps, 400, 413, 415)
# /feedback takes JSON or a labelled image, so its route reads the body itself, and says so here.
FEEDBACK_BODY = {
    "required": True,
    "content": {
        **json_content(ref("FeedbackRequest")),
        "multipart/form-data": {"schema": ref("LabelledImage")},
    },
}
FEEDBACK = route(
    "feedback", FeedbackAccepted, 400, 404, 413, 415, 429,
    openapi_extra={"requestBody": FEEDBACK_BODY},
)  # fmt: skip
REVIEW_QUEUE = route("review_queue", ReviewQueue, 400)
FEEDBACK_STATS = route("feedback_stats", FeedbackStats)
MODEL = route("model_card", ModelCard)
MONITOR = route("monitor", Monitor, 400)
RELOAD = route("reload", Reloaded, 401, 403, openapi_extra={"security": [{"adminToken": []}]})


def _rows(items: dict, length: int) -> dict:
    return {"type": "array", "minItems": length, "maxItems": length, "items": items}


PIXEL = {"type": "number", "minimum": 0, "maximum": 255}
ROW_OF_TEN = _rows({"type": "number"}, 10)
CLASSIFY_REQUEST = {
    "type": "object",
    "required": ["pixels"],
    "properties": {
        "pixels": {
            "type": "array",
            "maxItems": MAX_CLASSIFY_IMAGES,
            "items": _rows(_rows(PIXEL, 28), 28),
        }
    },
}

# The routes BentoML itself serves, next to ours.
_TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}
BENTOML_PATHS = {
    "/livez": {"get": {"summary": "the process is alive", "responses": {200: _TEXT}}},
    "/readyz": {
        "get": {
            "summary": "ready to serve (model loaded)",
            "responses": {200: _TEXT, 503: {"description": "not ready yet", **_TEXT}},
        }
    },
    "/healthz": {"get": {"summary": "same as /livez", "responses": {200: _TEXT}}},
    "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {200: _TEXT}}},
    "/classify": {
        "post": {
            "summary": "Classify",
            "description": "Probabilities [N, 10] for inputs [N, 28, 28] already shaped like "
            "MNIST (0-255, white ink on black), adaptively batched by BentoML.",
            "requestBody": {"required": True, "content": json_content(CLASSIFY_REQUEST)},
            "responses": {
                200: {
                    "description": "probabilities, one row of 10 per input",
                    "content": json_content({"type": "array", "items": ROW_OF_TEN}),
                },
                400: {
                    "description": "pixels missing, not [N, 28, 28], or outside 0-255",
                    "content": json_content(ref("ClassifyError")),
                },
                415: {"description": "the body is not JSON", "content": json_content(ref("Error"))},
                503: {
                    "description": ERROR_MEANINGS[503],
                    "content": json_content(ref("ClassifyError")),
                },
            },
        }
    },
}


def document(app: FastAPI, model: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document of `app`'s routes plus BentoML's, naming the serving `model`."""
    if app.openapi_schema is None:
        spec = app.openapi()
        spec["paths"] = {**BENTOML_PATHS, **spec["paths"]}
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for extra in (FeedbackRequest, LabelledImage, ClassifyError, Error):
            schema = extra.model_json_schema(ref_template=REF_TEMPLATE, mode="validation")
            schemas[extra.__name__] = schema
        token = {"type": "http", "scheme": "bearer", "description": "DIGITOPS_ADMIN_TOKEN"}
        spec["components"]["securitySchemes"] = {"adminToken": token}
    spec = dict(app.openapi_schema)
    version = model.get("version") or "shipped"
    spec["info"] = {
        "title": "digitops: handwritten digit recognition",
        "version": f"{__version__} (model {model.get('name')} {version})",
        "description": f"{DESCRIPTION}\nServing model: {model.get('name')} version {version}, "
        f"from {model.get('source')}.",
        "x-model": model,
    }
    return spec


# Limits.
SEND_AN_IMAGE = "send the image as multipart form field 'image' (curl -F image=@digit.png)"


def media_type(request: Request) -> str:
    """The request's Content-Type without its parameters, lower-cased ("" when none)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def multipart_only(request: Request) -> None:
    """A dependency of the upload routes: the body is a multipart form, with the options in it
    (FastAPI would read another body as an empty form, and ignore options in the query)."""
    content_type = media_type(request)
    if not content_type and request.headers.get("content-length", "0").strip("0") == "":
        raise RequestError(f"empty request; {SEND_AN_IMAGE}")
    if content_type != "multipart/form-data":
        raise RequestError(
            f"unsupported Content-Type {content_type or '(none)'!r}; {SEND_AN_IMAGE}", 415
        )
    if request.url.query:
        raise RequestError("options go in the form, beside the image, not in the URL")


def upload_route(operation: dict, files: int = 1) -> dict:
    """The route arguments of an upload route taking up to `files` images."""
    return {
        **operation,
        "dependencies": [Depends(multipart_only)],
        "form_limits": {"max_files": files, "max_fields": 16, "max_part_size": MAX_FIELD_BYTES},
    }


class BodyLimit:
    """ASGI middleware: a request body over its path's limit is refused with a JSON 413 as it
    streams in, before it is parsed or spooled to disk."""

    def __init__(self, app, limits: dict[str, int]):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        limit = self.limits.get(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            message = f"upload of {int(declared)} bytes is over the {limit}-byte limit"
            return await error_reply(413, message)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # FastAPI passes an HTTPException on to the error handlers
                raise HTTPException(413, f"upload is over the {limit}-byte limit")
            return message

        await self.app(scope, counted, send)


async def feedback_body(request: Request) -> FeedbackRequest | LabelledImage:
    """/feedback's body: a JSON label for a prediction, or a labelled image (a form)."""
    try:
        if media_type(request) == "multipart/form-data":
            limits = {"max_files": 1, "max_fields": 16, "max_part_size": MAX_FIELD_BYTES}
            return LabelledImage.model_validate(dict(await request.form(**limits)))
        try:
            body = await request.json()
        except ValueError:
            raise RequestError(
                'malformed JSON; send {"prediction_id": "...", "label": 0-9 or "not-a-digit"}'
            ) from None
        return FeedbackRequest.model_validate(body)
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from None


def check_admin_token(authorization: str, token: str | None) -> None:
    """Refuse an admin request without the server's token (401), or on a server without one."""
    if not authorization:
        raise RequestError("send the admin token: Authorization: Bearer <token>", 401)
    if not token:
        raise RequestError("reload is disabled: set DIGITOPS_ADMIN_TOKEN on the server", 403)
    if not hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode()):
        raise RequestError("missing or wrong admin token (Authorization: Bearer <token>)", 401)


class JSONOnly:
    """ASGI middleware: POSTs to `paths` (BentoML's own APIs) must be JSON; anything else gets a
    415 instead of BentoML's parser's 500."""

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


def pixel_array(value: object) -> np.ndarray:
    """Pixels of the `classify` API: nested lists of numbers 0-255 shaped [N, 28, 28], checked
    per request, before BentoML batches requests, so a bad call gets a 400 of its own."""
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
