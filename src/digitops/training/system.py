"""The Lightning system: loss, metrics and optimisation around the plain-torch DigitCNN."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from digitops.model import DigitCNN


class DigitClassifier(pl.LightningModule):
    def __init__(
        self,
        model_args: dict,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model_args = dict(model_args)
        self.model = DigitCNN(**self.model_args)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.steps_done = 0

    def setup(self, stage: str) -> None:
        # NHWC is what oneDNN's convolutions run fastest on the CPU;
        # the batches follow (MnistDataModule.on_after_batch_transfer).
        self.model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch, stage: str, accuracy: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        smoothing = self.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        accuracy(logits, y)
        on_step = stage == "train"
        self.log(
            f"{stage}/loss",
            loss,
            on_step=on_step,
            on_epoch=True,
            sync_dist=True,
            prog_bar=stage != "test",
        )
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage != "test")
        return loss

    def training_step(self, batch, batch_idx):
        self.steps_done += 1
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        # The schedule peaks at the optimizer's lr and needs the run length, known only once
        # the trainer is set up.
        scheduler = self.scheduler_factory(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=int(self.trainer.estimated_stepping_batches),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_train_end(self) -> None:
        # Proof that every rank trained and that DDP kept their weights identical.
        steps = torch.tensor([float(self.steps_done)], device=self.device)
        checksum = torch.stack([p.detach().double().sum() for p in self.parameters()]).sum()
        gathered_steps = self.all_gather(steps).flatten().tolist()
        gathered_sums = self.all_gather(checksum.reshape(1)).flatten().tolist()
        self.rank_summary = {
            "world_size": self.trainer.world_size,
            "steps_per_rank": [int(s) for s in gathered_steps],
            "param_checksum_per_rank": gathered_sums,
        }
