"""The service's published contract: the shape of every reply, every request body and option,
and every error, as the OpenAPI document at /docs.json that clients generate code from and
tests fuzz.

The routes read their bodies themselves (multipart or a raw image, streamed with a size cap),
so FastAPI cannot infer them; each route's `openapi_extra` here says what it really takes.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, Field

from digitops import __version__
from digitops.inference.http import (
    BATCH_FIELD,
    EXPLAIN_OPTIONS,
    FEATURE_MAP_OPTIONS,
    FEEDBACK_IMAGE_FIELDS,
    IMAGE_FIELD,
    MAX_BATCH_IMAGES,
    MAX_CLASSIFY_IMAGES,
    PREDICT_OPTIONS,
)
from digitops.inference.preprocess import INVERT_WORDS
from digitops.inference.store import STRATEGIES
from digitops.model import DigitCNN

REF_TEMPLATE = "#/components/schemas/{model}"
DESCRIPTION = """\
Reads a handwritten digit from a drawing or a photo and says which digit it is, how sure it is
(all ten probabilities), what the model saw (the 28x28 input) and where it looked (Grad-CAM).
Corrections sent to `/feedback` become training data; `/review_queue` lists the predictions the
model is least sure of.

Images go in as multipart form field `image` (PNG, JPEG, WebP, BMP, GIF or TIFF) or as the raw
request body with an `image/*` Content-Type. Every error is JSON `{"error": ..., "status": ...}`
that says what was wrong and what to send instead.
"""


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


class Prediction(BaseModel):
    digit: int = Field(ge=0, le=9)
    confidence: float = Field(ge=0, le=1)
    probabilities: Probabilities = Field(min_length=10, max_length=10)
    inverted: bool = Field(description="whether dark ink on a light background was inverted")
    input_png: str = Field(description="base64 PNG of the 28x28 input the model saw")
    prediction_id: str = Field(description="send it back to /feedback to correct the answer")
    model: ModelIdentity
    logged: Literal[False] | None = Field(
        None, description="present (false) when the prediction was not stored for feedback"
    )


class Explanation(BaseModel):
    digit: int = Field(ge=0, le=9)
    confidence: float = Field(ge=0, le=1)
    probabilities: Probabilities = Field(min_length=10, max_length=10)
    inverted: bool
    input_png: str
    model: ModelIdentity
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


class FeedbackRequest(BaseModel):
    prediction_id: str = Field(min_length=1, description="from a /predict reply")
    label: int = Field(ge=0, le=9, description="the digit it really is")
    comment: str | None = Field(None, max_length=1000)


class FeedbackAccepted(BaseModel):
    feedback_id: str
    prediction_id: str
    label: int = Field(ge=0, le=9)
    status: Literal["pending", "ingested", "merged", "rejected"]
    replaced: bool = Field(description="true when this label replaced an earlier one")
    previous_label: int | None = Field(None, ge=0, le=9)


class ReviewItem(BaseModel):
    prediction_id: str
    created_at: float
    digit: int = Field(ge=0, le=9)
    confidence: float
    probabilities: Probabilities
    entropy: float
    margin: float
    input_png: str


Strategy = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]


class ReviewQueue(BaseModel):
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
    mlflow_ui_url: str | None = None


class Reloaded(BaseModel):
    previous: ModelCard
    current: ModelCard
    workers: int


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
    422: "no digit found: nothing in the image stands out from its background",
    429: "too many requests from this client; retry after a minute",
    503: "busy or a dependency (the prediction store, the model store) is unavailable",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": Error, "description": ERROR_MEANINGS[s]} for s in (*statuses, 503)}


def _option(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}  # fmt: skip


INVERT = {"type": "string", "enum": list(INVERT_WORDS)}
OPTIONS = {
    "invert": (INVERT, "auto: decide from the image; true/false: force"),
    "noise": ({"type": "number", "minimum": 0, "maximum": 1}, "stress test: Gaussian noise"),
    "seed": ({"type": "integer", "minimum": 0, "maximum": 2**32 - 1}, "noise seed"),
    "log": ({"type": "boolean"}, "false: do not store for feedback (previews)"),
    "target": ({"type": "integer", "minimum": 0, "maximum": 9}, "class to explain"),
    "layer": ({"type": "string", "enum": list(DigitCNN.conv_layers)}, "conv block"),
    "arrays": ({"type": "boolean"}, "also return the raw activations"),
    "label": ({"type": "integer", "minimum": 0, "maximum": 9}, "the digit it really is"),
    "comment": ({"type": "string", "maxLength": 1000}, "anything else to say"),
}
RAW_IMAGE = {"schema": {"type": "string", "format": "binary"}}


def image_body(names: tuple[str, ...], field: str = IMAGE_FIELD, many: bool = False) -> dict:
    """OpenAPI for a route that takes an upload (multipart or raw) and options `names`, which
    may come as query parameters or as form fields."""
    upload = {"type": "string", "format": "binary"}
    if many:
        upload = {"type": "array", "items": upload, "minItems": 1, "maxItems": MAX_BATCH_IMAGES}
    form = {
        "type": "object",
        "required": [field],
        "properties": {field: upload, **{n: OPTIONS[n][0] for n in names}},
    }
    content = {"multipart/form-data": {"schema": form}}
    if not many:
        content |= {"image/*": RAW_IMAGE}  # any image type, as the raw body
    return {
        "parameters": [_option(n, *OPTIONS[n]) for n in names],
        "requestBody": {"required": True, "content": content},
    }


# A prediction's id is what /feedback needs: the link lets clients (and the fuzzer) follow it.
CORRECT_IT = {
    "operationId": "feedback",
    "requestBody": {"prediction_id": "$response.body#/prediction_id", "label": 7},
    "description": "say which digit it really was",
}
PREDICT = {
    "operation_id": "predict",
    "responses": {
        200: {"model": Prediction, "links": {"CorrectIt": CORRECT_IT}},
        **errors(400, 413, 415, 422),
    },
    "openapi_extra": image_body(PREDICT_OPTIONS),
}
PREDICT_BATCH = {
    "operation_id": "predict_batch",
    "responses": {200: {"model": BatchPredictions}, **errors(400, 413, 415)},
    "openapi_extra": image_body(PREDICT_OPTIONS, field=BATCH_FIELD, many=True),
}
EXPLAIN = {
    "operation_id": "explain",
    "responses": {200: {"model": Explanation}, **errors(400, 413, 415, 422)},
    "openapi_extra": image_body(EXPLAIN_OPTIONS),
}
FEATURE_MAPS = {
    "operation_id": "feature_maps",
    "responses": {200: {"model": FeatureMaps}, **errors(400, 413, 415, 422)},
    "openapi_extra": image_body(FEATURE_MAP_OPTIONS),
}
# A labelled image needs its label; its options go in the form (a JSON body has no query).
_labelled_image = image_body(FEEDBACK_IMAGE_FIELDS)["requestBody"]["content"]["multipart/form-data"]
_labelled_image["schema"]["required"].append("label")
FEEDBACK = {
    "operation_id": "feedback",
    "responses": {200: {"model": FeedbackAccepted}, **errors(400, 404, 413, 415, 422, 429)},
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                **json_content(ref("FeedbackRequest")),
                "multipart/form-data": _labelled_image,
            },
        }
    },
}
REVIEW_QUEUE = {
    "operation_id": "review_queue",
    "responses": {200: {"model": ReviewQueue}, **errors(400)},
}
FEEDBACK_STATS = {
    "operation_id": "feedback_stats",
    "responses": {200: {"model": FeedbackStats}, **errors()},
}
MODEL = {"operation_id": "model_card", "responses": {200: {"model": ModelCard}, **errors()}}
RELOAD = {
    "operation_id": "reload",
    "responses": {200: {"model": Reloaded}, **errors(401, 403)},
    "openapi_extra": {"security": [{"adminToken": []}]},
}


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
        for extra in (FeedbackRequest, ClassifyError, Error):
            schemas[extra.__name__] = extra.model_json_schema(ref_template=REF_TEMPLATE)
        spec["components"]["securitySchemes"] = {
            "adminToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "DIGITOPS_ADMIN_TOKEN of the server",
            }  # fmt: skip
        }
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
