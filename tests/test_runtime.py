"""The served forward pass (ONNX Runtime) computes what the torch model computes."""

import numpy as np
import torch

from digitops import checkpoint
from digitops.data import mnist
from digitops.inference.served import ServedModel
from digitops.model import fold_batchnorm, normalize


def test_onnx_runtime_gives_the_eager_models_probabilities(mnist_dir):
    model, metadata = checkpoint.load("models/default/model.pt")
    served = ServedModel(fold_batchnorm(model), metadata, "test")
    images, _ = mnist.load(mnist_dir, "t10k")
    with torch.inference_mode():
        eager = torch.softmax(model.eval()(normalize(torch.from_numpy(images))), dim=1).numpy()
    batched = served.probabilities(images)
    assert batched.shape == (len(images), 10)
    assert np.abs(batched - eager).max() <= 1e-5
    one_by_one = np.concatenate([served.probabilities(images[i : i + 1]) for i in range(32)])
    assert np.abs(one_by_one - eager[:32]).max() <= 1e-5
