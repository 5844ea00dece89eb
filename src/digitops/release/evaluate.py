"""Score a model on labelled digits and draw the confusion matrix and the mistakes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from digitops import checkpoint
from digitops.data import feedback, mnist
from digitops.model import normalize
from digitops.tracking import Tracking


@torch.inference_mode()
def predict_proba(model: torch.nn.Module, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities [N, 10] for uint8 images [N, 28, 28] (white ink on black)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = normalize(torch.from_numpy(images[start : start + batch_size])).to(device)
        out.append(F.softmax(model(batch), dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 10), dtype=np.float32)


def score(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, mean cross-entropy, per-class accuracy and the confusion matrix."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return {"count": 0, "accuracy": None, "loss": None}
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    eps = 1e-12
    loss = -np.log(probabilities[np.arange(len(labels)), labels] + eps).mean()
    return {
        "count": int(len(labels)),
        "accuracy": float((predicted == labels).mean()),
        "loss": float(loss),
        "per_class_accuracy": {str(c): round(float(a), 6) for c, a in enumerate(per_class)},
        "confusion": confusion.tolist(),
        "errors": int((predicted != labels).sum()),
    }


def confusion_png(confusion: list[list[int]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=100)
    # Log colour scale: on a 99%-accurate model the diagonal would wash out every error.
    ax.imshow(np.log1p(matrix), cmap="Blues")
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(n),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if i == j else ("crimson" if n else "lightgray"),
        )
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def misclassified_png(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, limit: int = 64
) -> bytes:
    """A grid of the most confidently wrong digits, titled `true->predicted (confidence)`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:limit]
    cols = 8
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.35), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"{labels[i]}->{predicted[i]} ({probabilities[i, predicted[i]]:.2f})", fontsize=7
        )
    if len(wrong) == 0:
        axes.flat[0].set_title("no mistakes", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def evaluate_checkpoint(cfg) -> dict:
    """The `evaluate` stage: score the trained checkpoint, write metrics and plots, register it.

    Writes under `paths.eval_dir`: metrics.json, confusion.csv/png, misclassified.png and the
    candidate checkpoint (the trained one with its scores and registry version in its metadata).
    """
    out = Path(cfg.paths.eval_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, metadata = checkpoint.load(cfg.paths.checkpoint)
    model_args = metadata.pop("model_args")
    run_id = metadata.get("mlflow_run_id")
    if run_id:  # trained with the MLflow logger: evaluate the same run, register the model
        tracking = Tracking.from_config(cfg)
        tracking.check()  # before anything is written

    images, labels = mnist.load(Path(cfg.paths.mnist), "t10k")
    probabilities = predict_proba(model, images)
    test = score(probabilities, labels)
    fb_images, fb_labels = feedback.load(Path(cfg.paths.feedback), split="holdout")
    holdout = score(predict_proba(model, fb_images), fb_labels)

    metrics = {
        "test": {k: test[k] for k in ("accuracy", "loss", "errors", "count", "per_class_accuracy")},
        "feedback_holdout": {k: holdout.get(k) for k in ("accuracy", "count")},
    }
    Path(cfg.paths.metrics).write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / "confusion.csv", "w") as f:
        f.write("actual,predicted\n")
        predicted = probabilities.argmax(axis=1)
        f.writelines(f"{a},{p}\n" for a, p in zip(labels.tolist(), predicted.tolist(), strict=True))
    title = f"MNIST test: {test['accuracy']:.2%} ({test['errors']} errors)"
    (out / "confusion.png").write_bytes(confusion_png(test["confusion"], title))
    (out / "misclassified.png").write_bytes(misclassified_png(images, labels, probabilities))

    metadata.update(
        test_accuracy=test["accuracy"],
        test_loss=test["loss"],
        feedback_holdout_accuracy=holdout["accuracy"],
        feedback_holdout_count=holdout["count"],
    )
    if run_id:
        scores = {"test/acc": test["accuracy"], "test/loss": test["loss"]}
        if holdout["count"]:
            scores["feedback_holdout/acc"] = holdout["accuracy"]
        tracking.log_evaluation(run_id, scores, out)
        metadata["registered_model"] = cfg.mlflow.registered_model
        metadata["registered_version"] = tracking.register(
            model,
            run_id,
            example=images[:2],
            tags={
                "test_accuracy": f"{test['accuracy']:.4f}",
                "data_version": metadata.get("data_version"),
                "git_commit": metadata.get("git_commit"),
            },
        )
    checkpoint.save(cfg.paths.candidate, model, model_args, metadata)
    if run_id:
        # Serving rebuilds the model from this file (weights + args + metadata), not the pt2 graph.
        tracking.log_checkpoint(run_id, Path(cfg.paths.candidate))
    return metrics
