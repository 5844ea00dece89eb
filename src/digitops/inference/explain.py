"""Grad-CAM and feature maps, computed functionally: no hooks, so concurrent requests
can share one model without ever seeing each other's activations."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from digitops.files import png
from digitops.model import DigitCNN


def grad_cam(
    model: DigitCNN, x: torch.Tensor, target: int | None = None
) -> tuple[np.ndarray, torch.Tensor]:
    """Grad-CAM of the last conv block for one input [1, 1, 28, 28].

    Returns (heatmap float32 [28, 28] in [0, 1], logits [10]). `target` defaults to the
    predicted class.
    """
    with torch.no_grad():  # the gradient is taken at the last conv block: no graph before it
        features = model.features(x)
    with torch.enable_grad():
        activations = features.requires_grad_(True)
        logits = model.classifier(activations)[0]
        cls = int(logits.argmax()) if target is None else int(target)
        (gradients,) = torch.autograd.grad(logits[cls], activations)
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # channel importance: pooled gradients
    cam = F.relu((weights * activations.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    return cam.numpy().astype(np.float32), logits.detach()


def feature_maps(model: DigitCNN, x: torch.Tensor, layer: str) -> np.ndarray:
    """Activations [C, H, W] of conv block `layer` (conv1..conv3) for one input."""
    if layer not in model.conv_layers:
        raise ValueError(f"layer must be one of {', '.join(model.conv_layers)}, got {layer!r}")
    with torch.inference_mode():
        for name in model.conv_layers:
            x = getattr(model, name)(x)
            if name == layer:
                return x[0].numpy()
    raise AssertionError("unreachable")


def _colormap(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] to RGB uint8 with a 'jet'-like ramp (blue -> cyan -> yellow -> red)."""
    v = np.clip(values, 0, 1)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([r, g, b], axis=-1) * 255).astype(np.uint8)


def overlay_png(pixels: np.ndarray, cam: np.ndarray, scale: int = 8, alpha: float = 0.5) -> bytes:
    """The heatmap blended over the 28x28 input the model saw, enlarged for viewing."""
    gray = np.repeat(pixels[..., None].astype(np.float32), 3, axis=-1)
    blended = (1 - alpha) * gray + alpha * _colormap(cam).astype(np.float32)
    return png(blended.round().astype(np.uint8), scale=scale)


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
