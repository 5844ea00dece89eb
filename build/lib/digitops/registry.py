"""MLflow model logging and registry: one place that knows the registry's API."""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature

from digitops.model import DigitCNN
from digitops.preprocess import normalize

log = logging.getLogger(__name__)


def log_and_register(
    model: DigitCNN,
    run_id: str,
    tracking_uri: str,
    registered_model: str,
    example: np.ndarray,
    tags: dict[str, str] | None = None,
) -> str:
    """Log `model` to run `run_id` (pytorch flavour, with signature and example), register it.

    Returns the new registered version.
    """
    mlflow.set_tracking_uri(tracking_uri)
    x = normalize(torch.from_numpy(example)).numpy()
    with torch.inference_mode():
        signature = infer_signature(x, model(torch.from_numpy(x)).numpy())
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            registered_model_name=registered_model,
            signature=signature,
            input_example=x,
            serialization_format="pt2",  # torch.export graph: loading executes no pickled code
            pip_requirements=["torch", "digitops"],
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient(tracking_uri)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(registered_model, version, key, str(value))
    log.info("registered %s version %s from run %s", registered_model, version, run_id)
    return version


def load(model_uri: str, tracking_uri: str) -> torch.nn.Module:
    """A callable module from `models:/name/version` (or any MLflow model URI), on CPU.

    Models are logged in the `pt2` format (torch.export): loading runs no pickled code, and
    the graph was traced in eval mode, so there is no train/eval switch to get wrong.
    """
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pytorch.load_model(model_uri, map_location="cpu")
