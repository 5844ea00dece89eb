"""Grad-CAM and feature maps, computed functionally: no hooks, so concurrent requests
can share one model without ever seeing each other's activations."""

from __future__ import annotations

import functools

import cv2
import numpy as np
from torch import nn

from digitops.files import png
from digitops.inference.predictor import b64, prediction_payload
from digitops.inference.preprocess import Preprocessed
from digitops.inference.served import DIGIT_SCORE, PROBABILITIES, ServedModel
from digitops.model import IMAGE_SIZE, DigitCNN

LAST_CONV = DigitCNN.conv_layers[-1]  # Grad-CAM's layer


def explanation(served: ServedModel, prepared: Preprocessed, target: int | None) -> dict:
    """/explain's reply: the prediction, and the Grad-CAM heatmap of the last conv block for
    the predicted (or `target`) class."""
    probabilities, digit_score, activations = served.onnx.run(
        prepared.pixels[None], PROBABILITIES, DIGIT_SCORE, LAST_CONV
    )
    cam, _ = grad_cam(served.model, activations, target)
    # Explanations are not logged: feedback goes through /predict.
    payload = prediction_payload(
        probabilities[0].tolist(),
        float(digit_score[0]),
        png(prepared.pixels),
        prepared.inverted,
        served,
        None,
    )
    return {
        **payload,
        "target": payload["digit"] if target is None else target,
        "layer": LAST_CONV,
        "cam": np.round(cam, 4).tolist(),
        "overlay_png": b64(overlay_png(prepared.pixels, cam)),
    }


def feature_map_reply(served: ServedModel, prepared: Preprocessed, layer: str, arrays: bool):
    """/feature_maps's reply: every channel of conv block `layer` as a PNG grid."""
    (maps,) = served.onnx.run(prepared.pixels[None], layer)
    maps = maps[0]  # [C, H, W]
    reply = {
        "layer": layer,
        "channels": int(maps.shape[0]),
        "size": list(maps.shape[1:]),
        "grid_png": b64(grid_png(maps)),
        "inverted": prepared.inverted,
    }
    if arrays:
        reply["maps"] = np.round(maps, 4).tolist()
    return reply


def grad_cam(
    model: DigitCNN, activations: np.ndarray, target: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of the last conv block from its activations [1, C, H, W]: (heatmap float32
    [28, 28] in [0, 1], logits [10]); `target` defaults to the predicted class.

    Grad-CAM weighs each channel by the mean of the class logit's gradient over it. After the
    conv blocks come max pooling and linear layers with ReLUs between, so that gradient is a
    few products with the layers' weights, in numpy. Max pooling hands each output's gradient
    to one input, leaving a channel's sum of gradients unchanged. tests/test_runtime.py checks
    the result against autograd."""
    x = activations[0]
    channels, height, width = x.shape
    features, backward = x, []  # backward: what the gradient passes through, in forward order
    for layer in model.classifier:
        if isinstance(layer, nn.MaxPool2d):
            features = _max_pool(features, layer)
        elif isinstance(layer, nn.Flatten):
            features = features.reshape(-1)
        elif isinstance(layer, nn.Linear):
            weight = layer.weight.detach().numpy()
            features = weight @ features + layer.bias.detach().numpy()
            backward.append(weight)
        elif isinstance(layer, nn.ReLU):
            active = features > 0
            features = features * active
            backward.append(active)
        elif not isinstance(layer, nn.Dropout):  # dropout does nothing in eval mode
            raise TypeError(f"grad_cam has no gradient for {type(layer).__name__}")
    logits = features
    cls = int(logits.argmax()) if target is None else int(target)
    gradient = backward.pop()[cls]  # d logit[cls] / d the last layer's inputs
    for step in reversed(backward):
        gradient = gradient * step if step.dtype == bool else gradient @ step
    weights = gradient.reshape(channels, -1).sum(axis=1) / (height * width)
    cam = np.maximum(weights @ x.reshape(channels, -1), 0).reshape(height, width)
    # Bilinear with half-pixel centres, as torch's interpolate(align_corners=False).
    cam = cv2.resize(cam, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
    peak = cam.max()
    cam = cam / peak if peak > 0 else np.zeros_like(cam)
    return cam.astype(np.float32, copy=False), logits


def _max_pool(x: np.ndarray, pool: nn.MaxPool2d) -> np.ndarray:
    """`pool` (stride = kernel, no padding: what DigitCNN builds) of x [C, H, W]."""
    k = pool.kernel_size
    if pool.stride != k or pool.padding != 0 or pool.dilation != 1 or pool.ceil_mode:
        raise TypeError(f"grad_cam has no gradient for {pool}")
    height, width = x.shape[1] // k * k, x.shape[2] // k * k
    return functools.reduce(
        np.maximum, (x[:, i:height:k, j:width:k] for i in range(k) for j in range(k))
    )


RAMP = np.array([3, 2, 1], dtype=np.float32)  # where red, green and blue peak, in 4 * value


def _colormap(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] to RGB uint8 with a 'jet'-like ramp (blue -> cyan -> yellow -> red)."""
    v = np.clip(values, 0, 1)[..., None]
    return (np.clip(1.5 - np.abs(4 * v - RAMP), 0, 1) * 255).astype(np.uint8)


def overlay_png(pixels: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> bytes:
    """The heatmap blended over the 28x28 input the model saw, at that size (a viewer enlarges
    it with nearest-neighbour scaling, as the web page does)."""
    gray = pixels[..., None].astype(np.float32)
    blended = (1 - alpha) * gray + alpha * _colormap(cam).astype(np.float32)
    return png(blended.round().astype(np.uint8))


def grid_png(maps: np.ndarray, scale: int = 4, pad: int = 1) -> bytes:
    """All channels [C, H, W] tiled in a near-square grid, each scaled to its own [0, 255]."""
    c, h, w = maps.shape
    cols = int(np.ceil(np.sqrt(c)))
    rows = int(np.ceil(c / cols))
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    norm = np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 0)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 64, dtype=np.uint8)
    for i in range(c):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = (norm[i] * 255).round().astype(np.uint8)
    return png(canvas, scale=scale)
