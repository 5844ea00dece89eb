"""The model a server serves: where it came from (the BentoML store, the MLflow registry or the
shipped file), exported to ONNX and run by ONNX Runtime (benchmarks/bench_forward.py compares it
with torch eager, TorchScript and torch.compile). Predictions, Grad-CAM's activations and feature
maps all come from ONNX Runtime; Grad-CAM's gradient is a few products with the classifier's
weights (explain.grad_cam)."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import bentoml
import numpy as np
import onnx
import onnxruntime
import torch
from onnx import numpy_helper

from digitops import checkpoint, monitoring, scoring
from digitops.model import DigitCNN, fold_batchnorm, normalize

if TYPE_CHECKING:  # importing mlflow takes seconds; only a server following the registry needs it
    from digitops.tracking import ModelVersion, Tracking

PROBABILITIES = "probabilities"
DIGIT_SCORE = "digit_score"
FEATURES = "features"  # what the classifier reads: the Monitor's embeddings come from them


class _Outputs(torch.nn.Module):
    """Pixels to answers in one graph (input scaling, model, calibrated softmax, digit score:
    digitops.scoring), with the classifier's input features and every conv block's
    activations as outputs too."""

    def __init__(self, model: DigitCNN, scorer: scoring.Scorer):
        super().__init__()
        self.model, self.scorer = model, scorer

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, summaries, blocks = scoring.descriptors(self.model, normalize(pixels))
        probabilities, _, digit_score = self.scorer(logits, summaries)
        return probabilities, digit_score, summaries["features"], *blocks


class OnnxModel:
    """`model` exported in eval mode with its fitted `scorer`: uint8 pixels [N, 28, 28] (white
    ink on black) in; the probabilities, digit scores or a conv block's activations out. One
    thread per call by default: the service's other work needs the other cores."""

    def __init__(self, model: DigitCNN, scorer: scoring.Scorer, threads: int = 1):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(
            _graph(model, scorer), options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    def run(self, pixels: np.ndarray, *outputs: str) -> list[np.ndarray]:
        """`outputs` (PROBABILITIES, DIGIT_SCORE, FEATURES or a conv block's name) for
        `pixels`."""
        feed = {self._input: np.ascontiguousarray(pixels, dtype=np.uint8)}
        return self._session.run(list(outputs), feed)


# Exporting takes seconds of CPU, most of a rollout; a new version of the same network differs
# only in its weights. Each architecture is exported once per process, and later versions
# swap their weights into that graph.
_EXPORTED: dict[str, onnx.ModelProto] = {}


def _graph(model: DigitCNN, scorer: scoring.Scorer) -> bytes:
    """`model` (eval mode) and its scorer as a serialized ONNX graph."""
    outputs = _Outputs(model.eval(), scorer)
    weights = {name: tensor.detach().numpy() for name, tensor in outputs.state_dict().items()}
    architecture = repr(model)  # every layer and its sizes; the forward pass is DigitCNN's
    exported = _EXPORTED.get(architecture)
    if exported is None:
        exported = _export(outputs)
        if not weights.keys() <= {tensor.name for tensor in exported.graph.initializer}:
            return exported.SerializeToString()  # a weight was folded away: nothing to swap
        _EXPORTED[architecture] = exported
    graph = onnx.ModelProto()
    graph.CopyFrom(exported)
    for tensor in graph.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
    return graph.SerializeToString()


def _export(outputs: _Outputs) -> onnx.ModelProto:
    example = torch.zeros(2, 28, 28, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():  # the exporter narrates its steps as warnings
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            outputs,
            (example,),
            dynamo=True,
            dynamic_shapes={"pixels": {0: batch}},
            output_names=[PROBABILITIES, DIGIT_SCORE, FEATURES, *outputs.model.conv_layers],
            verbose=False,
        )
    return program.model_proto


@dataclass
class ServedModel:
    """The network plus where it came from: what /predict reports as the model's identity."""

    model: DigitCNN  # BatchNorm folded; Grad-CAM and feature maps run it
    metadata: dict
    source: str
    store_tag: str | None = None  # the BentoML store entry, when it came from there
    registry_version: str | None = None  # the MLflow registry version, when it came from there
    # The same network run by ONNX Runtime, input scaling and scoring included.
    onnx: OnnxModel = field(init=False, repr=False)
    threshold: float = field(init=False)  # the least digit score of a digit
    # What the Monitor compares this model's inputs with; None for a model trained before it.
    reference: monitoring.Reference | None = field(init=False)

    def __post_init__(self) -> None:
        fitted = self.metadata.get("scoring")
        if fitted is None:
            raise ModelUnavailable(
                f"{self.source} has no calibration or digit score (trained before they "
                "existed): fit them with python -m pipelines.calibrate +checkpoint=PATH"
            )
        scorer = scoring.Scorer(fitted)
        self.threshold = scorer.threshold
        self.onnx = OnnxModel(self.model, scorer)
        fitted = self.metadata.get("monitor")
        self.reference = None if fitted is None else monitoring.Reference(fitted)

    def answers(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(calibrated probabilities [N, 10], digit scores [N], the Monitor's embeddings
        [N, d] or None without a reference) for uint8 pixels [N, 28, 28], white ink on black."""
        probabilities, digit_scores, features = self.onnx.run(
            pixels, PROBABILITIES, DIGIT_SCORE, FEATURES
        )
        embeddings = None if self.reference is None else self.reference.embed(features)
        return probabilities, digit_scores, embeddings

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
            "temperature": m["scoring"]["temperature"],
            "digit_threshold": self.threshold,
        }


def load_served_model(
    store_tag: str | None, shipped: Path | None, fallback: bool = True
) -> ServedModel:
    """The champion imported into the BentoML model store, else (if `fallback` and the store
    has none) `shipped`. An entry that does not load is an error, never a fallback."""
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
    # The registry names the version, whatever the checkpoint recorded.
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
