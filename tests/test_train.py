"""Training smoke run end to end: Lightning fit, MLflow run + registry, evaluation outputs."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from digitops import checkpoint, monitoring, scoring
from digitops.data import mnist
from digitops.model import normalize
from digitops.release.evaluate import evaluate_checkpoint
from digitops.tracking import Tracking
from digitops.training.train import HISTORY_FIELDS, run_name, train
from tests.conftest import compose_cfg

pytestmark = pytest.mark.slow  # trains (the smoke trainer, two epochs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir, evalsets_dir, renders_dir):
    cfg = compose_cfg(
        tmp_path_factory.mktemp("run"),
        mnist_dir,
        "trainer=smoke",
        "trainer.max_epochs=2",
        f"paths.evalsets={evalsets_dir}",
        f"paths.renders={renders_dir}",
        "data.rendered_share=0.5",
    )
    metadata = train(cfg)
    metrics = evaluate_checkpoint(cfg)
    return cfg, metadata, metrics


def test_smoke_training_logs_run_params_metrics_and_registers(trained):
    cfg, metadata, metrics = trained
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(metadata["mlflow_run_id"])
    assert run.data.params["model.channels"] == str(list(cfg.model.channels))
    assert run.data.params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert run.info.run_name == run_name(cfg) and run_name(cfg).startswith("cnn ")
    for key in ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "test/acc", "test/ece",
                "test/uncalibrated_ece", "realworld/ece", "ood/auroc", "ood/msp/auroc",
                "ood/energy/accepted_at_99", "ood/rejected/letters"):  # fmt: skip
        assert key in run.data.metrics, key
    for key in ("perf/epoch_seconds", "perf/train_images_per_second", "train_seconds"):
        assert run.data.metrics[key] > 0, key
    # What it trained on, at its DVC version: the runs table's Dataset column.
    (mnist_input,) = run.inputs.dataset_inputs  # the feedback set is empty here
    assert mnist_input.dataset.name == "mnist"
    assert mnist_input.dataset.digest == metadata["data_version"][:12]
    train_count = len(mnist.load(cfg.paths.mnist, "train")[1]) - cfg.data.val_size
    assert json.loads(mnist_input.dataset.profile)["features_shape"] == [train_count, 28, 28]
    assert [(t.key, t.value) for t in mnist_input.tags] == [("mlflow.data.context", "training")]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert [m.step for m in history] == sorted(m.step for m in history) and len(history) == 2
    assert run.data.tags["data_version"] and run.data.tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    eval_files = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/confusion.png", "eval/misclassified.png", "eval/realworld_misses.png",
            "eval/metrics.json"} <= eval_files  # fmt: skip
    version = client.get_model_version(cfg.mlflow.registered_model, "1")
    assert version.run_id == run.info.run_id
    assert float(version.tags["test_accuracy"]) == pytest.approx(metrics["test"]["accuracy"], 1e-3)


def test_registered_model_predicts_like_trained_checkpoint(trained, mnist_dir):
    cfg, _, _ = trained
    candidate, metadata = checkpoint.load(cfg.paths.candidate)
    assert metadata["registered_version"] == "1"
    loaded = Tracking.from_config(cfg).load_logged_model("1")
    images, _ = mnist.load(mnist_dir, "t10k")
    x = normalize(torch.from_numpy(images[:50]))
    with torch.inference_mode():
        assert torch.allclose(candidate(x), loaded(x), atol=1e-5)


def test_evaluation_writes_dvc_metrics_and_plots(trained):
    cfg, metadata, metrics = trained
    on_disk = json.loads(Path(cfg.paths.metrics).read_text())
    assert on_disk == metrics
    assert on_disk["test"]["count"] == 300
    assert set(on_disk["test"]["per_class_accuracy"]) == {str(d) for d in range(10)}
    assert on_disk["feedback_holdout"]["count"] == 0
    rows = Path(cfg.paths.history).read_text().splitlines()
    assert rows[0].split(",") == list(HISTORY_FIELDS) and len(rows) == 3
    confusion_rows = (Path(cfg.paths.eval_dir) / "confusion.csv").read_text().splitlines()
    assert confusion_rows[0] == "actual,predicted" and len(confusion_rows) == 301
    _, candidate_meta = checkpoint.load(cfg.paths.candidate)
    assert candidate_meta["test_accuracy"] == metrics["test"]["accuracy"]
    assert set(candidate_meta["mnist_sha256"]) == set(mnist.FILES)
    # Calibration and "not a digit", before and after, on MNIST and the real-world set.
    for name in ("test", "realworld"):
        for key in ("ece", "nll", "brier"):
            assert on_disk[name][key] >= 0 and on_disk[name]["uncalibrated"][key] >= 0, key
    # Real-world accuracy per kind and European style, with 95% intervals; for the kinds drawn
    # from MNIST test digits, the same digits' accuracy as 28x28 images beside it.
    realworld = on_disk["realworld"]
    assert set(realworld["per_kind"]) >= {"canvas", "paper"}  # font kinds need the fonts
    for kind, report in realworld["per_kind"].items():
        assert report["low"] <= report["accuracy"] <= report["high"] and report["count"] == 5
        assert ("same_digits_28x28" in report) == (not kind.startswith("font")), kind
    assert realworld["count"] == 5 * len(realworld["per_kind"])
    assert (Path(cfg.paths.eval_dir) / "realworld_misses.png").read_bytes().startswith(b"\x89PNG")
    ood = on_disk["ood"]
    assert ood["score"] == "mahalanobis" and ood["auroc"] == ood["scores"]["mahalanobis"]["auroc"]
    assert set(ood["scores"]) == {"msp", "energy", "mahalanobis"}
    assert set(ood["rejected_per_category"]) >= {"blank", "letters", "scribbles", "multi-digit"}
    assert candidate_meta["test_ece"] == on_disk["test"]["ece"]
    reliability = (Path(cfg.paths.eval_dir) / "reliability.csv").read_text().splitlines()
    assert reliability[0] == "set,scores,confidence,accuracy,count" and len(reliability) > 2
    assert (Path(cfg.paths.eval_dir) / "reliability.png").read_bytes().startswith(b"\x89PNG")


def test_training_fits_a_temperature_and_a_not_a_digit_threshold(trained):
    cfg, metadata, metrics = trained
    fitted = metadata["scoring"]
    assert 0.05 < fitted["temperature"] < 20
    # Fitted to the validation split's likelihood: calibrated NLL is no worse on test either.
    assert metrics["test"]["nll"] <= metrics["test"]["uncalibrated"]["nll"] + 0.01
    assert fitted["keep"] == cfg.scoring.keep and len(fitted["reference"]) == cfg.data.val_size
    # And the Monitor's reference: validation inputs' embeddings and image statistics.
    reference = metadata["monitor"]
    size = min(monitoring.REFERENCE_SIZE, cfg.data.val_size)
    assert reference["embeddings"].shape == (size, monitoring.EMBEDDING_DIMS)
    assert reference["stats"].shape == (len(monitoring.IMAGE_STATS), size)
    assert 0 < reference["estimated_accuracy"] <= 1 and abs(sum(reference["digits"]) - 1) < 1e-6


def test_calibrated_probabilities_are_a_distribution(trained, mnist_dir):
    cfg, _, _ = trained
    model, metadata = checkpoint.load(cfg.paths.checkpoint)
    images, _ = mnist.load(mnist_dir, "t10k")
    p = scoring.answers(model, metadata["scoring"], images[:10], batch_size=4)["probabilities"]
    assert p.shape == (10, 10) and np.allclose(p.sum(axis=1), 1, atol=1e-5)


def test_fine_tuning_needs_the_same_network_but_not_the_same_dropout(tmp_path, mnist_dir, trained):
    start = trained[0].paths.checkpoint

    def fine_tune(name: str, *overrides: str) -> dict:
        cfg = compose_cfg(tmp_path / name, mnist_dir, "trainer=smoke", "logger=csv", *overrides)
        return train(cfg)

    with pytest.raises(ValueError, match="different network"):
        fine_tune("seed-network", f"init_from={start}", "model=cnn_seed")
    tuned = fine_tune("more-dropout", f"init_from={start}", "model.dropout=0.3")
    assert tuned["config"]["model"]["dropout"] == 0.3
