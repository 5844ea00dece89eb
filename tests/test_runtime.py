"""The served forward pass (ONNX Runtime) computes what the torch model computes."""

import numpy as np
import torch

from digitops import checkpoint
from digitops.data import mnist
from digitops.inference import explain
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


def test_activations_and_grad_cam_from_onnx_match_torch(mnist_dir):
    model, metadata = checkpoint.load("models/default/model.pt")
    served = ServedModel(fold_batchnorm(model), metadata, "test")
    images, _ = mnist.load(mnist_dir, "t10k")
    for image in images[:8]:
        x = normalize(torch.from_numpy(image[None]))
        with torch.inference_mode():
            for name in served.model.conv_layers:
                x = getattr(served.model, name)(x)
                onnx = explain.feature_maps(served.onnx, image, name)
                assert np.abs(onnx - x[0].numpy()).max() <= 1e-4 * max(1.0, float(x.abs().max()))
        from_torch, logits = explain.grad_cam(served.model, x.numpy())
        from_onnx, _ = explain.grad_cam(served.model, served.onnx.run(image[None], "conv3"))
        assert np.abs(from_onnx - from_torch).max() <= 1e-4
        probabilities = torch.softmax(logits, dim=0).numpy()
        assert np.abs(probabilities - served.probabilities(image[None])[0]).max() <= 1e-5
