"""The network the service runs: exported to ONNX and run by ONNX Runtime
(tests/benchmarks/bench_forward.py compares it with torch eager, TorchScript and
torch.compile; README.md, "Serving", has the figures). Predictions, Grad-CAM's activations and
feature maps all come from it; Grad-CAM's gradient, through the small classifier only, is
taken with torch."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime
import torch

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
        example = torch.zeros(2, 28, 28, dtype=torch.uint8)
        batch = torch.export.Dim("batch", min=1, max=4096)
        with warnings.catch_warnings():  # the exporter narrates its steps as warnings
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Outputs(model.eval()),
                (example,),
                dynamo=True,
                dynamic_shapes={"pixels": {0: batch}},
                output_names=[PROBABILITIES, *model.conv_layers],
                verbose=False,
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(
            program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    def run(self, pixels: np.ndarray, output: str) -> np.ndarray:
        """`output` (PROBABILITIES or a conv block's name) for `pixels`."""
        feed = {self._input: np.ascontiguousarray(pixels, dtype=np.uint8)}
        return self._session.run([output], feed)[0]

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return self.run(pixels, PROBABILITIES)
