"""Every config group option and every experiment composes and instantiates."""

from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch

from digitops.data.datamodule import MnistDataModule
from digitops.model import DigitCNN
from digitops.training.train import build_datamodule, build_system, supported_precision

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in ("model", "trainer", "logger", "experiment"):
        assert options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize("model", options("model"))
def test_model_options_build(make_cfg, model):
    cfg = make_cfg(f"model={model}")
    system = build_system(cfg)
    assert isinstance(system.model, DigitCNN)
    assert system.model_args["dropout"] == cfg.model.dropout


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_options_instantiate(make_cfg, trainer):
    cfg = make_cfg(f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=1")
    assert isinstance(hydra.utils.instantiate(cfg.trainer, logger=False), pl.Trainer)


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_options_instantiate(make_cfg, logger):
    cfg = make_cfg(f"logger={logger}")
    assert hydra.utils.instantiate(cfg.logger) is not None


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose_and_build(make_cfg, experiment):
    cfg = make_cfg(f"+experiment={experiment}")
    assert isinstance(build_datamodule(cfg), MnistDataModule)
    system = build_system(cfg)
    optimizer = system.optimizer_factory(system.parameters())
    scheduler = system.scheduler_factory(optimizer, max_lr=cfg.optimizer.lr, total_steps=1000)
    assert optimizer.param_groups[0]["lr"] <= cfg.optimizer.lr
    assert scheduler is not None


def test_command_line_style_overrides(make_cfg):
    cfg = make_cfg("model.dropout=0.3", "trainer.max_epochs=2")
    assert cfg.model.dropout == 0.3 and cfg.trainer.max_epochs == 2


def test_ddp_trainer_is_data_parallel(make_cfg):
    cfg = make_cfg("trainer=ddp")
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2


def test_bf16_falls_back_to_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    assert supported_precision("32-true") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert supported_precision("bf16-mixed") == "32-true"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert supported_precision("bf16-mixed") == "bf16-mixed"
