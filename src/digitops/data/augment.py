"""Batched random affine augmentation, done on whole tensors.

Per-sample PIL transforms would cost more CPU than the CNN itself on a 2-core machine;
one affine_grid + grid_sample call per batch is a small fraction of a training step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(
    x: torch.Tensor,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rotate by U(-degrees, degrees), shift by U(-translate, translate) of the size, zoom U(scale).

    `x` holds raw [0, 1] pixels [N, C, H, W], so the zero padding that appears at the borders
    is MNIST's black background.
    """
    n = x.shape[0]
    opts = {"device": x.device, "dtype": x.dtype}

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=x.device).to(x.dtype)

    angle = uniform(-degrees, degrees) * (math.pi / 180)
    zoom = uniform(*scale)
    # affine_grid maps output coordinates to input coordinates, so invert the zoom.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3, **opts)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    # Normalised coordinates span [-1, 1], so a shift of t of the image size is 2t.
    theta[:, 0, 2] = uniform(-translate, translate) * 2
    theta[:, 1, 2] = uniform(-translate, translate) * 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
