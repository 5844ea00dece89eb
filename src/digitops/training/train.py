"""Fit the CNN from a composed config and write a self-describing checkpoint."""

from __future__ import annotations

import copy
import csv
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, RichProgressBar, WeightAveraging
from pytorch_lightning.loggers import MLFlowLogger
from torch.optim.swa_utils import get_ema_multi_avg_fn

from digitops import checkpoint, monitoring, scoring
from digitops.data import mnist
from digitops.data.datamodule import MnistDataModule
from digitops.tracking import Tracking, data_version, flatten, git_commit
from digitops.training.system import DigitClassifier

log = logging.getLogger(__name__)

HISTORY_FIELDS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "epoch_seconds",
    "train_images_per_second",
)


class EpochTimer(pl.Callback):
    """Logs each epoch's wall time and its training images per second (validation excluded)."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.started = time.perf_counter()
        self.images = 0
        self.training_seconds = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += len(batch[1])

    def on_validation_start(self, trainer, pl_module):
        if trainer.training:  # the validation loop inside a training epoch
            self.training_seconds = time.perf_counter() - self.started

    def on_train_epoch_end(self, trainer, pl_module):
        elapsed = time.perf_counter() - self.started
        training = self.training_seconds or elapsed
        pl_module.log("perf/epoch_seconds", elapsed)
        pl_module.log("perf/train_images_per_second", self.images * trainer.world_size / training)


class EpochHistory(pl.Callback):
    """Writes one CSV row per epoch: the training curves `dvc plots` draws."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(HISTORY_FIELDS)

    def on_train_epoch_end(self, trainer, pl_module):
        # Runs after the epoch's validation loop, so both sets of metrics are in.
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        row = [trainer.current_epoch]
        row += [
            round(float(m[k]), 6) if k in m else ""
            for k in ("train/loss_epoch", "train/acc", "val/loss", "val/acc")
        ]
        row.append(f"{lr:.6g}")
        row += [
            round(float(m[k]), 1) if k in m else ""
            for k in ("perf/epoch_seconds", "perf/train_images_per_second")
        ]
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(row)


class ExponentialAveraging(WeightAveraging):
    """Validates with, and finally keeps, an exponential moving average of the weights (and
    BatchNorm statistics): a smoother end point than the last step's weights."""

    def __init__(self, decay: float):
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay))


def build_datamodule(cfg: DictConfig) -> MnistDataModule:
    return MnistDataModule(
        mnist_dir=cfg.paths.mnist,
        feedback_dir=cfg.paths.feedback,
        batch_size=cfg.data.batch_size,
        val_size=cfg.data.val_size,
        seed=cfg.seed,
        feedback_oversample=cfg.data.feedback_oversample,
        augment=OmegaConf.to_container(cfg.data.augment),
        num_workers=cfg.data.num_workers,
        renders=Path(cfg.paths.renders) / "train.npz",
        rendered_share=cfg.data.rendered_share,
    )


def build_system(cfg: DictConfig) -> DigitClassifier:
    return DigitClassifier(
        model_args=OmegaConf.to_container(cfg.model),
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        label_smoothing=cfg.label_smoothing,
    )


def run_name(cfg: DictConfig) -> str:
    """The recipe at a glance, for MLflow's runs table: 'cnn 32-48-96 k5-3-3 15ep bs128
    lr0.003 bf16-mixed' (+ ' finetune')."""
    model = cfg.model
    parts = [
        "cnn " + "-".join(str(c) for c in model.channels),
        "k" + "-".join(str(k) for k in model.get("kernel_sizes", (3, 3, 3))),
        f"{cfg.trainer.max_epochs}ep",
        f"bs{cfg.data.batch_size}",
        f"lr{cfg.optimizer.lr:g}",
        str(cfg.trainer.precision),
    ]
    return " ".join(parts) + (" finetune" if cfg.get("init_from") else "")


def supported_precision(requested: str) -> str:
    """`requested`, or 32-true where it asks for bf16 on a CPU without native bf16 instructions
    (AVX512-BF16 or AMX), where emulated bf16 runs slower than fp32."""
    if not str(requested).startswith("bf16") or torch.cuda.is_available():
        return str(requested)
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return str(requested)
    log.warning("this CPU has no native bf16: training in fp32 instead of %s", requested)
    return "32-true"


def resolve_init(cfg: DictConfig) -> Path:
    """`init_from`: a checkpoint path, or `champion` (the registry's, else the shipped model)."""
    if cfg.init_from != "champion":
        return Path(cfg.init_from)
    dest = Path(cfg.paths.train_dir) / "init"
    champion = Tracking.from_config(cfg).aliased(cfg.promotion.alias, dest)
    if champion is None:
        log.info("no champion in the registry yet: fine-tuning from %s", cfg.paths.shipped_model)
        return Path(cfg.paths.shipped_model)
    log.info("fine-tuning from champion version %s", champion.version)
    return champion.path


def train(cfg: DictConfig) -> dict | None:
    """Fit, then (on rank 0) save the checkpoint. Returns its metadata, or None on other ranks."""
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    # Record what was trained on; the data stage already verified the canonical files.
    checksums = {name: mnist.sha256(Path(cfg.paths.mnist) / name) for name in mnist.FILES}

    datamodule = build_datamodule(cfg)
    system = build_system(cfg)
    if cfg.get("init_from"):
        # Fine-tuning: start from a trained model's weights instead of noise.
        start, start_meta = checkpoint.load(resolve_init(cfg))
        # Same weights, same shapes: a different dropout is fine, another network is not.
        shapes = {k: v.shape for k, v in start.state_dict().items()}
        if shapes != {k: v.shape for k, v in system.model.state_dict().items()}:
            raise ValueError(
                f"init_from {cfg.init_from} is a different network ({start_meta['model_args']}) "
                f"from the one the config asks for ({system.model_args})"
            )
        system.model.load_state_dict(start.state_dict())
    logger = hydra.utils.instantiate(cfg.logger)
    # The timer logs before the history row reads its figures.
    callbacks = [EpochTimer(), EpochHistory(cfg.paths.history), LearningRateMonitor("epoch")]
    if cfg.get("ema_decay"):
        callbacks.append(ExponentialAveraging(cfg.ema_decay))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=cfg.paths.train_dir,
        precision=supported_precision(cfg.trainer.precision),
    )

    resolved = OmegaConf.to_container(cfg, resolve=True)
    provenance = {"git_commit": git_commit(), "data_version": data_version()}
    if isinstance(logger, MLFlowLogger):
        logger.log_hyperparams(flatten({k: v for k, v in resolved.items() if k != "paths"}))
        if trainer.is_global_zero:
            Tracking.from_config(cfg).describe_run(
                logger.run_id, run_name(cfg), OmegaConf.to_yaml(cfg, resolve=True), provenance
            )

    started = time.perf_counter()
    trainer.fit(system, datamodule=datamodule)
    wall = time.perf_counter() - started
    if not trainer.is_global_zero:
        return None

    summary = system.rank_summary
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    fitted = fit_scoring(system.model, datamodule, cfg.scoring.keep)
    reference = fit_monitor(system.model, datamodule, fitted, cfg.seed)
    metadata = {
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "train_seconds": round(wall, 1),
        "epochs": trainer.current_epoch,
        "val_accuracy": metrics.get("val/acc"),
        "num_feedback_samples": datamodule.num_feedback,
        "mnist_sha256": checksums,
        "config": resolved,
        "mlflow_run_id": getattr(logger, "run_id", None),
        "mlflow_tracking_uri": cfg.mlflow.tracking_uri
        if isinstance(logger, MLFlowLogger)
        else None,
        "ranks": summary,
        "torch_threads": torch.get_num_threads(),
        "host_cpus": os.cpu_count(),
        **provenance,
        "scoring": fitted,
        "monitor": reference,
    }
    checkpoint.save(cfg.paths.checkpoint, system.model, system.model_args, metadata)
    if isinstance(logger, MLFlowLogger):
        logger.log_metrics({"train_seconds": wall})
        Tracking.from_config(cfg).log_datasets(
            logger.run_id, datamodule.training_data, provenance["data_version"]
        )
    log.info(
        "trained %d epochs in %.0fs: val acc %.4f, temperature %.3f; ranks %s",
        trainer.current_epoch,
        wall,
        metrics.get("val/acc", float("nan")),
        fitted["temperature"],
        summary,
    )
    return metadata


def fit_scoring(model: torch.nn.Module, datamodule: MnistDataModule, keep: float) -> dict:
    """The calibration and digit score of the trained `model` (digitops.scoring): statistics
    from the MNIST training digits, temperature and threshold from the validation split."""
    model = copy.deepcopy(model).cpu().float().eval()
    _, train_images, train_labels = datamodule.training_data["mnist"]
    val_images, _, val_labels = (t.numpy() for t in datamodule.val_set.tensors)
    return scoring.fit(model, (train_images, train_labels), (val_images, val_labels), keep)


def fit_monitor(model: torch.nn.Module, datamodule: MnistDataModule, fitted: dict, seed: int):
    """The Monitor's reference (digitops.monitoring) for the trained `model` and its scoring
    `fitted`: the validation digits, each replaced by its rendering as often as training
    replaced a digit, so that it looks like what the model was trained on."""
    model = copy.deepcopy(model).cpu().float().eval()
    images, rendered, _ = (t.numpy() for t in datamodule.val_set.tensors)
    swap = np.random.default_rng(seed).random(len(images)) < datamodule.rendered_share
    pixels = np.where(swap[:, None, None], rendered, images)
    answers = scoring.answers(model, fitted, pixels)
    return monitoring.fit_reference(answers, pixels, fitted["threshold"], seed)


def refit_scoring(cfg: DictConfig, path: Path) -> dict:
    """Fit the scoring and the Monitor's reference of an existing checkpoint (one trained
    before they existed) on this config's MNIST split, and write them into the checkpoint."""
    model, metadata = checkpoint.load(path)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    metadata["scoring"] = fit_scoring(model, datamodule, cfg.scoring.keep)
    metadata["monitor"] = fit_monitor(model, datamodule, metadata["scoring"], cfg.seed)
    checkpoint.save(path, model, metadata.pop("model_args"), metadata)
    return metadata["scoring"]
