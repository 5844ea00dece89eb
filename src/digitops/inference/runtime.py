"""The network the service runs: exported to ONNX and run by ONNX Runtime
(benchmarks/bench_forward.py compares it with torch eager, TorchScript and
torch.compile; docs/benchmarks.md has the figures). Predictions, Grad-CAM's activations and
feature maps all come from it; Grad-CAM's gradient, through the small classifier only, is a
few products with its weights (explain.grad_cam)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import numpy_helper

from digitops.model import DigitCNN, normalize

PROBABILITIES = "probabilities"


class _Outputs(torch.nn.Module):
    """Pixels to probabilities in one graph - the input scaling, the model and its softmax -
    with every conv block's activations as outputs too. (Scaling 784 pixels with torch ops
    outside the graph cost more than the whole network.)"""

    def __init__(self, model: DigitCNN):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, blocks = normalize(pixels), []
        for name in self.model.conv_layers:
            x = getattr(self.model, name)(x)
            blocks.append(x)
        return torch.softmax(self.model.classifier(x), dim=1), *blocks


class OnnxModel:
    """`model` exported in eval mode: uint8 pixels [N, 28, 28] (white ink on black) in; the
    probabilities, or a conv block's activations, out. A call computes only what it asks for.

    One thread per call by default: the service's other work needs the other cores, and an
    intra-op pool's threads spin between calls (0.1 ms for one image either way).
    """

    def __init__(self, model: DigitCNN, threads: int = 1):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(
            _graph(model), options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    def run(self, pixels: np.ndarray, output: str) -> np.ndarray:
        """`output` (PROBABILITIES or a conv block's name) for `pixels`."""
        feed = {self._input: np.ascontiguousarray(pixels, dtype=np.uint8)}
        return self._session.run([output], feed)[0]

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return self.run(pixels, PROBABILITIES)


# torch.export traces the network for every export: 2.8 s of CPU on an idle core of the 2-core
# machine, 10 s and more under load - most of a rollout. A new version of the same network,
# which is what a rollout serves, differs only in its weights: each architecture is exported
# once per process, and later versions swap their weights into that graph (milliseconds).
_EXPORTED: dict[str, onnx.ModelProto] = {}


def _graph(model: DigitCNN) -> bytes:
    """`model` (eval mode) as a serialized ONNX graph."""
    outputs = _Outputs(model.eval())
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
            output_names=[PROBABILITIES, *outputs.model.conv_layers],
            verbose=False,
        )
    return program.model_proto
