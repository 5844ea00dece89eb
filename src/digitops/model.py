"""The digit CNN and its input scale, in plain torch: training, evaluation, serving, Grad-CAM
and feature maps all use it, none of them through Lightning."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

NUM_CLASSES = 10
IMAGE_SIZE = 28
# Mean and standard deviation of MNIST training pixels scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Pixels scaled to [0, 1] -> the model's input scale (what training used)."""
    return (x - MNIST_MEAN) / MNIST_STD


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] or [N, 1, 28, 28], white ink on black -> float input [N, 1, 28, 28]."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return standardize(images.float() / 255.0)


def conv_block(in_channels: int, out_channels: int, kernel_size: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        # No conv bias: BatchNorm's shift makes it redundant.
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class DigitCNN(nn.Module):
    """Three conv blocks (conv, BatchNorm, ReLU; a 2x2 max-pool after the first two), then 10
    logits through a dense hidden layer or a linear read-out.

    The third block keeps 7x7 maps, so Grad-CAM has that resolution whichever head is used. The
    defaults are the seed's network (3x3 convs, dense 128, dropout 0.5), so every checkpoint
    written before the other options existed loads as it was trained.
    """

    # Named blocks are the public handles for feature maps and Grad-CAM.
    conv_layers = ("conv1", "conv2", "conv3")

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128),
        hidden: int = 128,
        dropout: float = 0.5,
        kernel_sizes: Sequence[int] = (3, 3, 3),
        pool_features: bool = False,
        num_classes: int = NUM_CLASSES,
    ):
        super().__init__()
        for name, values in (("channels", channels), ("kernel_sizes", kernel_sizes)):
            if len(values) != 3:
                raise ValueError(
                    f"{name} must list 3 values, one per conv block, got {list(values)}"
                )
        if any(int(k) % 2 == 0 for k in kernel_sizes):
            raise ValueError(
                f"kernel_sizes must be odd (same-size padding), got {list(kernel_sizes)}"
            )
        (c1, c2, c3), (k1, k2, k3) = (int(c) for c in channels), (int(k) for k in kernel_sizes)
        self.conv1 = conv_block(1, c1, k1, pool=True)  # 28 -> 14
        self.conv2 = conv_block(c1, c2, k2, pool=True)  # 14 -> 7
        self.conv3 = conv_block(c2, c3, k3, pool=False)  # 7 -> 7
        head: list[nn.Module] = []
        spatial = IMAGE_SIZE // 4
        if pool_features:  # 7 -> 3: a ninth of the read-out's inputs
            head.append(nn.MaxPool2d(2))
            spatial //= 2
        head.append(nn.Flatten())
        flat = c3 * spatial * spatial
        if hidden:
            head += [
                nn.Linear(flat, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            ]
        else:
            head += [nn.Dropout(dropout), nn.Linear(flat, num_classes)]
        self.classifier = nn.Sequential(*head)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised (N, 1, 28, 28) images to (N, 10) logits."""
        return self.classifier(self.features(x))


def fold_batchnorm(model: DigitCNN) -> DigitCNN:
    """An inference copy with each BatchNorm folded into the conv before it: the same function
    in eval mode, with three fewer layers to run per forward pass."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for name in folded.conv_layers:
        block = getattr(folded, name)
        block[0] = fuse_conv_bn_eval(block[0], block[1])
        block[1] = nn.Identity()
    return folded
