"""The forward pass the service runs for predictions: the model exported to ONNX and run by
ONNX Runtime (tests/benchmarks/bench_forward.py compares it with torch eager, TorchScript and
torch.compile; README.md, "Serving", has the figures). Grad-CAM and feature maps keep using
the torch model: they need its gradients and intermediate activations."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import onnxruntime
import torch


class _Probabilities(torch.nn.Module):
    """The model with its softmax, so one graph call returns what a reply needs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


def onnx_session(model: torch.nn.Module, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping float32 inputs [N, 1, 28, 28] (the model's input scale) to
    probabilities [N, 10], computed by ONNX Runtime from `model` exported in eval mode.

    One thread per call by default: the service runs requests side by side, one per core, and
    an intra-op pool's threads spin between calls, taking the cores from other requests'
    preprocessing (0.12 ms for one image either way).
    """
    example = torch.zeros(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():  # the exporter narrates its steps as warnings
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Probabilities(model.eval()),
            (example,),
            dynamo=True,
            dynamic_shapes={"x": {0: batch}},
            verbose=False,
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name

    def probabilities(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return probabilities
