"""What the HTTP service does, as plain functions: pick the model, parse options, build replies.

The BentoML class in serving/service.py only wires these to routes.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digitops import checkpoint
from digitops.model import DigitCNN, fold_batchnorm
from digitops.preprocess import ImageError, parse_invert

# Relative to the working directory: the repo for `make serve`, the Bento's src/ when packaged.
SHIPPED_MODEL = Path(os.environ.get("DIGITOPS_SHIPPED_MODEL", "models/default/model.pt"))
STORE_MODEL_NAME = "digit-cnn"
CHECKPOINT_FILE = "model.pt"


@dataclass
class ServedModel:
    """The network plus where it came from: what /predict reports as the model's identity."""

    model: DigitCNN
    metadata: dict
    source: str
    store_tag: str | None = None  # the BentoML store entry, when it came from there

    def identity(self) -> dict:
        m = self.metadata
        return {
            "name": m.get("registered_model", STORE_MODEL_NAME),
            "version": m.get("registered_version"),
            "mlflow_run_id": m.get("mlflow_run_id"),
            "data_version": m.get("data_version"),
        }

    def card(self) -> dict:
        """Everything a user may want to know about the serving model (GET /model)."""
        m = self.metadata
        return {
            **self.identity(),
            "source": self.source,
            "test_accuracy": m.get("test_accuracy"),
            "trained_at": m.get("trained_at"),
            "git_commit": m.get("git_commit"),
            "model_args": m.get("model_args"),
            "mlflow_tracking_uri": m.get("mlflow_tracking_uri"),
            "mlflow_ui_url": os.environ.get("DIGITOPS_MLFLOW_UI"),
        }


def load_served_model(
    store_tag: str | None = None, shipped: Path = SHIPPED_MODEL, fallback: bool = True
) -> ServedModel:
    """The champion imported into the BentoML model store, else (if `fallback`) the shipped one."""
    tag = store_tag or f"{STORE_MODEL_NAME}:latest"
    try:
        import bentoml

        stored = bentoml.models.get(tag)
        model, metadata = checkpoint.load(stored.path_of(CHECKPOINT_FILE))
        source, found = f"bentoml model store {stored.tag}", str(stored.tag)
    except Exception as err:  # no store, no such tag, or an unreadable entry: fall back
        if store_tag or not fallback:  # never silently serve something other than asked
            raise RuntimeError(
                f"model {store_tag!r} not usable from the BentoML store: {err}"
            ) from err
        model, metadata = checkpoint.load(shipped)
        source, found = f"shipped {shipped}", None
    return ServedModel(fold_batchnorm(model), metadata, source, found)


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
        raise ImageError(f"'{name}' must be a number in [{lo:g}, {hi:g}], got {value!r}") from None
    if not lo <= number <= hi or np.isnan(number):
        raise ImageError(f"'{name}' must be in [{lo:g}, {hi:g}], got {value!r}")
    return number


def _parse_int(name: str, value: str, lo: int, hi: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ImageError(f"'{name}' must be an integer in [{lo}, {hi}], got {value!r}") from None
    if not lo <= number <= hi:
        raise ImageError(f"'{name}' must be in [{lo}, {hi}], got {value!r}")
    return number


def parse_options(raw: dict[str, str], layers: tuple[str, ...] = DigitCNN.conv_layers) -> Options:
    """Validate request options (form fields or query parameters); unknown keys are ignored."""
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
        if value not in layers:
            raise ImageError(f"'layer' must be one of {', '.join(layers)}, got {value!r}")
        kwargs["layer"] = value
    for flag in ("arrays", "log"):
        if (value := raw.get(flag)) not in (None, ""):
            kwargs[flag] = value.lower() in ("1", "true", "yes", "on")
    return Options(**kwargs)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def new_prediction_id() -> str:
    return uuid.uuid4().hex


def prediction_payload(
    probabilities: np.ndarray,
    input_png: bytes,
    inverted: bool,
    served: ServedModel,
    prediction_id: str | None,
) -> dict:
    """The JSON of a prediction; without `prediction_id` when it is not logged for feedback."""
    digit = int(np.argmax(probabilities))
    payload = {
        "digit": digit,
        "confidence": round(float(probabilities[digit]), 6),
        "probabilities": [round(float(p), 6) for p in probabilities],
        "inverted": bool(inverted),
        "input_png": b64(input_png),
        "prediction_id": prediction_id,
        "model": served.identity(),
    }
    if prediction_id is None:
        del payload["prediction_id"]
    return payload


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


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


def parse_feedback(body: dict) -> tuple[str, int, str | None]:
    """(prediction_id, label, comment) from a /feedback JSON body, or ImageError(400)."""
    if not isinstance(body, dict):
        raise ImageError('send a JSON object: {"prediction_id": "...", "label": 0-9}')
    prediction_id = body.get("prediction_id")
    if not isinstance(prediction_id, str) or not prediction_id:
        raise ImageError("'prediction_id' (string, from a /predict reply) is required")
    label = body.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 9:
        raise ImageError(f"'label' must be an integer digit 0-9, got {label!r}")
    comment = body.get("comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > 1000):
        raise ImageError("'comment' must be a string of at most 1000 characters")
    return prediction_id, label, comment
