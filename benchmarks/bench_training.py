"""Training benchmark: images per second of the default recipe and of the seed's, each through
Lightning and through a bare torch loop doing the same steps, and the wall time they imply.

    python -m benchmarks.bench_training [--steps 100] [--rounds 3] [--out artifacts/bench]

Both loops run the same model, data, augmentation, precision and optimiser; the gap between
them is what Lightning's own per-step work costs. They alternate for a few rounds and each
keeps its best round: on a shared virtual machine a single round varies by a third, and
interference only ever slows a round down. Writes training.json and training.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmarks import save_report
from digitops.training.train import build_datamodule, build_system, supported_precision

ROOT = Path(__file__).resolve().parents[1]
# name -> Hydra overrides on conf/config.yaml. The seed's recipe: its network, fp32, 15 epochs.
RECIPES = {
    "default": [],
    "seed": ["model=cnn_seed", "trainer.precision=32-true", "trainer.max_epochs=15"],
}
WARMUP = 20  # steps before the clock starts (allocator, oneDNN kernel selection)


def config(overrides: list[str]):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["logger=csv", *overrides])


def bare_loop(cfg, steps: int) -> float:
    """Images per second of plain torch doing what one Lightning training step does."""
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    system = build_system(cfg)
    model = system.model.to(memory_format=torch.channels_last).train()
    optimizer = system.optimizer_factory(model.parameters())
    scheduler = system.scheduler_factory(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=steps + WARMUP,
    )
    # Decided once, as the Trainer does: the check warns on CPUs without native bf16.
    bf16 = supported_precision(cfg.trainer.precision).startswith("bf16")
    batches = iter(datamodule.train_dataloader())
    started = 0.0
    for step in range(steps + WARMUP):
        if step == WARMUP:
            started = time.perf_counter()
        x, y = datamodule.prepare_batch(next(batches), augment=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return steps * cfg.data.batch_size / (time.perf_counter() - started)


class StepClock(pl.Callback):
    def __init__(self):
        self.started = 0.0
        self.elapsed = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == WARMUP:
            self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.elapsed = time.perf_counter() - self.started


def lightning_loop(cfg, steps: int) -> float:
    """Images per second of the pipeline's own Trainer for `steps` batches (no validation)."""
    clock = StepClock()
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_epochs=1,
        limit_train_batches=steps + WARMUP,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        precision=supported_precision(cfg.trainer.precision),
    )
    trainer.fit(build_system(cfg), datamodule=build_datamodule(cfg))
    return steps * cfg.data.batch_size / clock.elapsed


def measure(name: str, overrides: list[str], steps: int, rounds: int) -> dict:
    cfg = config(overrides)
    torch.manual_seed(0)
    bare, lightning = [], []
    for _ in range(rounds):
        bare.append(bare_loop(cfg, steps))
        lightning.append(lightning_loop(cfg, steps))
    bare, lightning = max(bare), max(lightning)
    train_images = 60_000 - cfg.data.val_size
    epoch_seconds = train_images / lightning
    return {
        "recipe": name,
        "model": OmegaConf.to_container(cfg.model),
        "precision": supported_precision(cfg.trainer.precision),
        "batch_size": cfg.data.batch_size,
        "epochs": cfg.trainer.max_epochs,
        "bare_img_per_s": round(bare),
        "lightning_img_per_s": round(lightning),
        "lightning_overhead_pct": round((bare / lightning - 1) * 100, 1),
        "epoch_seconds": round(epoch_seconds, 1),
        "run_seconds_estimate": round(epoch_seconds * cfg.trainer.max_epochs),
    }


def last_run(path: Path) -> dict | None:
    """What the last `dvc repro` training run of this checkout took (its checkpoint says)."""
    if not path.is_file():
        return None
    from digitops import checkpoint

    _, meta = checkpoint.load(path)
    return {
        "train_seconds": meta.get("train_seconds"),
        "epochs": meta.get("epochs"),
        "val_accuracy": meta.get("val_accuracy"),
        "host_cpus": meta.get("host_cpus"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = parser.parse_args()
    rows = [
        measure(name, overrides, args.steps, args.rounds) for name, overrides in RECIPES.items()
    ]
    default, seed = rows
    report = {
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "rounds": args.rounds,
        "recipes": rows,
        "speedup_vs_seed": round(default["lightning_img_per_s"] / seed["lightning_img_per_s"], 2),
        "last_train_run": last_run(ROOT / "artifacts" / "train" / "model.pt"),
    }
    lines = [
        "# Training throughput",
        "",
        f"Best of {args.rounds} rounds of {args.steps} steps (after {WARMUP} warm-up steps), "
        f"{report['torch_threads']} threads.",
        "",
        "| recipe | precision | batch | Lightning img/s | bare loop img/s | Lightning overhead "
        "| epoch | epochs | run (estimate) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['precision']} | {r['batch_size']} | "
            f"{r['lightning_img_per_s']} | {r['bare_img_per_s']} | "
            f"{r['lightning_overhead_pct']}% | {r['epoch_seconds']} s | {r['epochs']} | "
            f"{r['run_seconds_estimate']} s |"
        )
    overhead = default["lightning_overhead_pct"]
    lines += [
        "",
        f"- default recipe vs seed: {report['speedup_vs_seed']}x images/s",
        f"- Lightning overhead on the default recipe: {overhead}% "
        f"({'met' if overhead < 10 else 'NOT met'}: target < 10%)",
        f"- default recipe's run (estimate, training only): {default['run_seconds_estimate']} s "
        f"({'met' if default['run_seconds_estimate'] <= 300 else 'NOT met'}: target <= 300 s)",
    ]
    if report["last_train_run"]:
        run = report["last_train_run"]
        lines.append(
            f"- this checkout's last `dvc repro` train stage: {run['train_seconds']} s for "
            f"{run['epochs']} epochs, val accuracy {run['val_accuracy']}"
        )
    save_report(args.out, "training", report, lines)


if __name__ == "__main__":
    main()
