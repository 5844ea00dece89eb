"""Everything between an image and the model's input tensor, in one place.

Training, evaluation, the service and the tests all normalise through here.
"""

from __future__ import annotations

import numpy as np
import torch

# Mean and standard deviation of MNIST training pixels scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] or [N, 1, 28, 28] (white ink on black) -> float model input [N, 1, 28, 28]."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return (images.float() / 255.0 - MNIST_MEAN) / MNIST_STD


def denormalize(x: torch.Tensor) -> np.ndarray:
    """Model input back to uint8 pixels, for showing what the model saw."""
    pixels = (x.detach().cpu().float() * MNIST_STD + MNIST_MEAN).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).squeeze(1).numpy()
