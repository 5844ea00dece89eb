"""The model a server serves, and where it came from."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import bentoml
import numpy as np

from digitops import checkpoint
from digitops.inference.runtime import OnnxModel
from digitops.model import DigitCNN, fold_batchnorm

if TYPE_CHECKING:  # importing mlflow takes seconds; only a server following the registry needs it
    from digitops.tracking import ModelVersion, Tracking


@dataclass
class ServedModel:
    """The network plus where it came from: what /predict reports as the model's identity."""

    model: DigitCNN  # BatchNorm folded; Grad-CAM and feature maps run it
    metadata: dict
    source: str
    store_tag: str | None = None  # the BentoML store entry, when it came from there
    registry_version: str | None = None  # the MLflow registry version, when it came from there
    # The same network run by ONNX Runtime, input scaling and softmax included
    # (inference/runtime.py says why).
    onnx: OnnxModel = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.onnx = OnnxModel(self.model)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities [N, 10] for uint8 pixels [N, 28, 28], white ink on black."""
        return self.onnx.probabilities(pixels)

    def identity(self) -> dict:
        m = self.metadata
        return {
            "name": m.get("registered_model", checkpoint.BENTO_MODEL),
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
        }


def load_served_model(
    store_tag: str | None, shipped: Path | None, fallback: bool = True
) -> ServedModel:
    """The champion imported into the BentoML model store, else (if `fallback` and the store
    has none) `shipped`.

    An entry that exists but does not load is an error, never a reason to serve something
    else: the operator must hear that the champion is broken.
    """
    tag = store_tag or f"{checkpoint.BENTO_MODEL}:latest"
    try:
        stored = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as err:
        if store_tag or not fallback or shipped is None:  # never serve other than asked
            raise ModelUnavailable(f"model {tag!r} is not in the BentoML store: {err}") from err
        model, metadata = _load(shipped)
        return ServedModel(fold_batchnorm(model), metadata, f"shipped {shipped}", None)
    model, metadata = _load(Path(stored.path_of(checkpoint.FILE_NAME)))
    return ServedModel(
        fold_batchnorm(model), metadata, f"bentoml model store {stored.tag}", str(stored.tag)
    )


def load_registry_version(tracking: Tracking, alias: str, version: ModelVersion) -> ServedModel:
    """Registry version `version`, which holds `alias`, from the tracking server."""
    with tempfile.TemporaryDirectory() as tmp:
        model, metadata = _load(tracking.download(version, Path(tmp)).path)
    # The registry names the version, whatever the checkpoint recorded when it was registered
    # (the shipped model, say, registered again elsewhere).
    metadata.update(registered_model=tracking.model_name, registered_version=version.version)
    source = f"mlflow registry {tracking.model_name}@{alias} (version {version.version})"
    return ServedModel(fold_batchnorm(model), metadata, source, registry_version=version.version)


class ModelUnavailable(RuntimeError):
    """The asked-for model cannot be served; the message names it and says why."""


def _load(path: Path) -> tuple[DigitCNN, dict]:
    try:
        return checkpoint.load(path)
    except (OSError, checkpoint.CheckpointError) as err:
        raise ModelUnavailable(str(err)) from err
