"""The served forward pass (ONNX Runtime) computes what the torch model computes."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from digitops import checkpoint, scoring
from digitops.data import mnist
from digitops.inference import explain
from digitops.inference import served as runtime
from digitops.inference.served import ServedModel
from digitops.model import DigitCNN, fold_batchnorm, normalize


def test_onnx_runtime_gives_the_eager_models_answers(mnist_dir):
    """Probabilities (calibrated) and digit scores: ONNX Runtime's are torch's, batched or not."""
    model, metadata = checkpoint.load("models/default/model.pt")
    served = ServedModel(fold_batchnorm(model), metadata, "test")
    images, _ = mnist.load(mnist_dir, "t10k")
    eager = scoring.answers(model, metadata["scoring"], images)
    probabilities, digit_scores, _ = served.answers(images)
    assert probabilities.shape == (len(images), 10) and digit_scores.shape == (len(images),)
    assert np.abs(probabilities - eager["probabilities"]).max() <= 1e-5
    # A rank among 5,000 validation digits: float rounding may move it by a place or two.
    assert np.abs(digit_scores - eager["digit_score"]).max() <= 5e-4
    one_by_one = np.concatenate([served.answers(images[i : i + 1])[0] for i in range(32)])
    assert np.abs(one_by_one - eager["probabilities"][:32]).max() <= 1e-5


def test_a_new_version_of_the_same_network_swaps_its_weights_into_the_exported_graph(
    mnist_dir, monkeypatch
):
    """A rollout's model is exported once per architecture; every version gets its own
    weights and scoring - the answers are its eager model's - and another network its own
    export."""
    exports = []
    export = runtime._export
    monkeypatch.setattr(runtime, "_EXPORTED", {})
    monkeypatch.setattr(runtime, "_export", lambda outputs: exports.append(1) or export(outputs))
    images, labels = mnist.load(mnist_dir, "train")
    test_images, _ = mnist.load(mnist_dir, "t10k")
    shipped, _ = checkpoint.load("models/default/model.pt")
    other = fold_batchnorm(DigitCNN(channels=(8, 16, 32), hidden=0))
    for seed in (0, 1):
        torch.manual_seed(seed)
        for network in (fold_batchnorm(shipped), other):
            model = copy.deepcopy(network)  # a version of the network with other weights
            for parameter in model.parameters():
                parameter.data.add_(0.05 * torch.randn_like(parameter))
            fitted = scoring.fit(
                model, (images[:1000], labels[:1000]), (images[1000:], labels[1000:])
            )
            eager = scoring.answers(model, fitted, test_images[:64])
            probabilities, digit_scores = runtime.OnnxModel(model, scoring.Scorer(fitted)).run(
                test_images[:64], runtime.PROBABILITIES, runtime.DIGIT_SCORE
            )
            assert np.abs(probabilities - eager["probabilities"]).max() <= 1e-5
            assert np.abs(digit_scores - eager["digit_score"]).max() <= 0.011  # 1 of 200 ranks
    assert len(exports) == 2  # one per network, not one per version


def test_activations_and_grad_cam_from_onnx_match_torch(mnist_dir):
    model, metadata = checkpoint.load("models/default/model.pt")
    served = ServedModel(fold_batchnorm(model), metadata, "test")
    images, _ = mnist.load(mnist_dir, "t10k")
    temperature = metadata["scoring"]["temperature"]
    for image in images[:8]:
        x = normalize(torch.from_numpy(image[None]))
        with torch.inference_mode():
            for name in served.model.conv_layers:
                x = getattr(served.model, name)(x)
                (onnx,) = served.onnx.run(image[None], name)
                assert np.abs(onnx[0] - x[0].numpy()).max() <= 1e-4 * max(1.0, float(x.abs().max()))
        from_torch, logits = explain.grad_cam(served.model, x.numpy())
        (activations,) = served.onnx.run(image[None], "conv3")
        from_onnx, _ = explain.grad_cam(served.model, activations)
        assert np.abs(from_onnx - from_torch).max() <= 1e-4
        probabilities = torch.softmax(torch.from_numpy(logits) / temperature, dim=0).numpy()
        assert np.abs(probabilities - served.answers(image[None])[0][0]).max() <= 1e-5


def grad_cam_by_autograd(model: DigitCNN, activations: np.ndarray, target: int | None):
    """Grad-CAM as its paper defines it, by torch's autograd: what explain.grad_cam computes
    without it."""
    with torch.enable_grad():
        activations = torch.from_numpy(activations).requires_grad_(True)
        logits = model.classifier(activations)[0]
        cls = int(logits.argmax()) if target is None else target
        (gradients,) = torch.autograd.grad(logits[cls], activations)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=(28, 28), mode="bilinear", align_corners=False)[0, 0]
    return (cam / cam.max()).numpy(), logits.detach().numpy()


@pytest.mark.parametrize("pool_features", [True, False])
@pytest.mark.parametrize("hidden", [0, 24])
def test_grad_cam_is_autograds_for_every_read_out(pool_features, hidden):
    torch.manual_seed(0)
    model = DigitCNN(channels=(4, 8, 16), hidden=hidden, pool_features=pool_features).eval()
    for _ in range(4):
        activations = torch.relu(torch.randn(1, 16, 7, 7)).numpy()
        for target in (None, 3):
            cam, logits = explain.grad_cam(model, activations, target)
            expected_cam, expected_logits = grad_cam_by_autograd(model, activations, target)
            assert cam.dtype == np.float32 and cam.shape == (28, 28)
            assert np.abs(cam - expected_cam).max() <= 1e-5
            assert np.abs(logits - expected_logits).max() <= 1e-5


def test_grad_cam_refuses_a_layer_it_has_no_gradient_for():
    model = DigitCNN(channels=(4, 8, 16), hidden=0)
    model.classifier.insert(0, torch.nn.Tanh())
    with pytest.raises(TypeError, match="no gradient for Tanh"):
        explain.grad_cam(model, np.ones((1, 16, 7, 7), dtype=np.float32))
