"""MNIST (+ its rendered copies, + user feedback) as a LightningDataModule."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from digitops.data import feedback, mnist
from digitops.data.augment import random_affine
from digitops.model import standardize

log = logging.getLogger(__name__)


def _tensors(images, labels, rendered=None) -> TensorDataset:
    """(image, its rendered copy, label) triples; an image without a copy stands for its own.
    Kept as uint8 (47 MB for all of MNIST); scaled per batch on the training device."""
    images = torch.from_numpy(images.copy())
    rendered = images if rendered is None else torch.from_numpy(rendered.copy())
    return TensorDataset(images, rendered, torch.from_numpy(labels.astype("int64")))


class MnistDataModule(pl.LightningDataModule):
    """Train/val split of MNIST train (fixed seed) plus feedback; test is the 10k MNIST test set.

    With `renders` (the `renders` stage's train.npz), each training digit is replaced by its
    canvas or paper rendering with probability `rendered_share`, drawn anew every batch.
    """

    def __init__(
        self,
        mnist_dir: str | Path,
        feedback_dir: str | Path | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        feedback_oversample: int = 10,
        augment: dict | None = None,
        num_workers: int = 0,
        renders: str | Path | None = None,
        rendered_share: float = 0.0,
    ):
        super().__init__()
        self.mnist_dir = Path(mnist_dir)
        self.feedback_dir = Path(feedback_dir) if feedback_dir else None
        self.batch_size = batch_size
        self.val_size = val_size
        self.seed = seed
        self.feedback_oversample = feedback_oversample
        self.augment = dict(augment or {})
        self.num_workers = num_workers
        self.renders = Path(renders) if renders else None
        self.rendered_share = rendered_share
        self.num_feedback = 0
        # name -> (folder, images, labels): what the model trains on, for the run's record.
        self.training_data: dict[str, tuple[Path, np.ndarray, np.ndarray]] = {}

    def setup(self, stage: str | None = None) -> None:
        images, labels = mnist.load(self.mnist_dir, "train")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size].numpy(), order[self.val_size :].numpy()
        rendered = None
        if self.renders is not None and self.rendered_share > 0:
            if self.renders.is_file():
                with np.load(self.renders) as renders:
                    rendered = renders["pixels"]
            else:  # `dvc repro` always makes it; a quick `python -m pipelines.train` may not
                log.warning(
                    "%s is missing (make it with `dvc repro renders`): training on plain MNIST",
                    self.renders,
                )
        train_rendered, val_rendered = (
            (None, None)
            if rendered is None
            else (
                rendered[train_idx],
                rendered[val_idx],
            )
        )
        train_sets = [_tensors(images[train_idx], labels[train_idx], train_rendered)]
        self.training_data = {"mnist": (self.mnist_dir, images[train_idx], labels[train_idx])}
        if self.feedback_dir is not None:
            fb_images, fb_labels = feedback.load(self.feedback_dir, split="train")
            self.num_feedback = len(fb_labels)
            if self.num_feedback:
                # A few hundred corrections next to 55k MNIST digits would barely move the
                # loss; repeating them is the simplest reweighting that works with any sampler.
                train_sets += [_tensors(fb_images, fb_labels)] * self.feedback_oversample
                self.training_data["feedback"] = (self.feedback_dir, fb_images, fb_labels)
        self.train_set = ConcatDataset(train_sets)
        # Validated on plain digits; the renders ride along for the Monitor's reference.
        self.val_set = _tensors(images[val_idx], labels[val_idx], val_rendered)
        self.test_set = _tensors(*mnist.load(self.mnist_dir, "t10k"))

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        training = self.trainer is not None and self.trainer.training
        return self.prepare_batch(batch, augment=training)

    def prepare_batch(self, batch, augment: bool):
        """uint8 images -> the model's input (augmented when training), on the batch's device."""
        images, rendered, labels = batch
        if augment and self.rendered_share > 0:
            swap = torch.rand(len(images), device=images.device) < self.rendered_share
            images = torch.where(swap[:, None, None], rendered, images)
        x = images.unsqueeze(1).float() / 255.0
        if augment and self.augment.get("enabled", True):
            x = random_affine(
                x,
                degrees=self.augment.get("degrees", 10.0),
                translate=self.augment.get("translate", 0.1),
                scale=tuple(self.augment.get("scale", (0.9, 1.1))),
            )
        # NHWC, the layout DigitClassifier keeps its weights in.
        x = standardize(x).contiguous(memory_format=torch.channels_last)
        return x, labels
