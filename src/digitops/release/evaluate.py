"""Score a model on labelled digits and draw the confusion matrix and the mistakes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from digitops import checkpoint, scoring, stats
from digitops.data import feedback, mnist, notdigits
from digitops.tracking import Tracking


def load_evalsets(folder: Path) -> tuple[dict, dict]:
    """The `evalsets` stage's real-world digits and not-digits, as model inputs."""
    with np.load(folder / "realworld.npz") as digits, np.load(folder / "notdigits.npz") as others:
        return dict(digits), dict(others)


def scoring_of(metadata: dict, path) -> dict:
    fitted = metadata.get("scoring")
    if fitted is None:
        raise checkpoint.CheckpointError(
            f"{path} has no calibration or digit score (trained before they existed): fit them "
            "with python -m pipelines.calibrate +checkpoint=PATH"
        )
    return fitted


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


def _png(fig) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def most_confident_misses(probabilities: np.ndarray, labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the wrong answers, the most confident first, at most `limit`."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:limit]


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
    return _png(fig)


def misclassified_png(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, limit: int = 64
) -> bytes:
    """A grid of the most confidently wrong digits, titled `true->predicted (confidence)`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = probabilities.argmax(axis=1)
    wrong = most_confident_misses(probabilities, labels, limit)
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
    return _png(fig)


def accuracy_by(correct: np.ndarray, groups: np.ndarray) -> dict:
    """Accuracy per group (kind, style) with its 95% Wilson interval; empty group names skipped."""
    report = {}
    for group in sorted(set(groups.tolist()) - {""}):
        hits = correct[groups == group]
        low, high = stats.wilson(int(hits.sum()), len(hits))
        report[group] = {"accuracy": float(hits.mean()), "low": low, "high": high,
                         "count": len(hits), "errors": int((~hits).sum())}  # fmt: skip
    return report


def realworld_report(answers: dict, digits: dict, test_correct: np.ndarray) -> dict:
    """Accuracy on the real-world digits, per kind and per European style, with intervals. For
    the kinds redrawn from MNIST test digits, also the accuracy on the *same* digits as MNIST's
    28x28 images: the gap is what drawing and photographing cost."""
    correct = answers["probabilities"].argmax(axis=1) == digits["labels"]
    per_kind = accuracy_by(correct, digits["kinds"])
    for kind, report in per_kind.items():
        sources = digits["mnist_index"][digits["kinds"] == kind]
        if (sources >= 0).all():
            report["same_digits_28x28"] = float(test_correct[sources].mean())
    low, high = stats.wilson(int(correct.sum()), len(correct))
    return {
        "accuracy": float(correct.mean()),
        "low": low,
        "high": high,
        "errors": int((~correct).sum()),
        "count": len(correct),
        "per_kind": per_kind,
        "per_style": accuracy_by(correct, digits["styles"]),
    }


def misses_png(folder: Path, digits: dict, probabilities: np.ndarray, limit: int = 96) -> bytes:
    """Contact sheet of the real-world misses, most confident first: each image as sent beside
    the 28x28 input the model saw, titled `kind true->predicted (confidence)`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    labels, predicted = digits["labels"], probabilities.argmax(axis=1)
    wrong = most_confident_misses(probabilities, labels, limit)
    cols = 6  # pairs per row
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(
        rows, 2 * cols, figsize=(2 * cols * 1.1, rows * 1.3), dpi=100, squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for n, i in enumerate(wrong):
        sent, seen = axes.flat[2 * n], axes.flat[2 * n + 1]
        with Image.open(folder / str(digits["files"][i])) as image:
            image.thumbnail((96, 96))
            # Transparent canvas exports are shown on grey, so both stroke colours show.
            backdrop = Image.new("RGBA", image.size, (128, 128, 128, 255))
            backdrop.alpha_composite(image.convert("RGBA"))
            sent.imshow(np.asarray(backdrop.convert("RGB")))
        seen.imshow(digits["pixels"][i], cmap="gray", vmin=0, vmax=255)
        sent.set_title(
            f"{digits['kinds'][i]} {labels[i]}->{predicted[i]} "
            f"({probabilities[i, predicted[i]]:.2f})",
            fontsize=6,
            loc="left",
        )
    if len(wrong) == 0:
        axes.flat[0].set_title("no mistakes", fontsize=9)
    return _png(fig)


def calibration_report(answers: dict, labels: np.ndarray) -> dict:
    """ECE, NLL and Brier score after calibration, and the same before it (`uncalibrated`)."""
    after = scoring.calibration(answers["probabilities"], labels)
    before = scoring.calibration(answers["uncalibrated"], labels)
    keys = ("ece", "nll", "brier")
    return {**{k: after[k] for k in keys}, "uncalibrated": {k: before[k] for k in keys}}


# The not-a-digit scores compared: higher = more like a digit.
OOD_SCORES = {
    "msp": lambda a: a["probabilities"].max(axis=1),
    "energy": lambda a: a["energy"],
    "mahalanobis": lambda a: a["typicality"],
}
SERVED_SCORE = "mahalanobis"  # what digitops.scoring serves as digit_score


def not_a_digit_report(test: dict, realworld: dict, others: dict, categories, threshold) -> dict:
    """How well each score tells digits (MNIST test) from not-digits: AUROC, and the share of
    each category accepted where the score keeps 99% of MNIST test digits; then what the served
    threshold (fitted on validation digits) accepts and rejects."""
    categories = np.asarray(categories)
    judged = categories != notdigits.MULTI_DIGIT  # multi-digit inputs are reported apart
    compared = {}
    for name, score_of in OOD_SCORES.items():
        digits, non = score_of(test), score_of(others)
        cut = np.quantile(digits, 0.01)
        compared[name] = {
            "auroc": scoring.auroc(digits, non[judged]),
            "accepted_at_99": float((non[judged] >= cut).mean()),
            "accepted_at_99_per_category": {
                c: float((non[categories == c] >= cut).mean()) for c in sorted(set(categories))
            },
        }
    served = others["digit_score"] >= threshold
    return {
        "score": SERVED_SCORE,
        "auroc": compared[SERVED_SCORE]["auroc"],
        "threshold": threshold,
        "accepted": {
            "mnist_test": float((test["digit_score"] >= threshold).mean()),
            "realworld": float((realworld["digit_score"] >= threshold).mean()),
        },
        "rejected": float((~served[judged]).mean()),
        "rejected_per_category": {
            c: float((~served[categories == c]).mean()) for c in sorted(set(categories))
        },
        "count": int(judged.sum()),
        "scores": compared,
    }


def reliability_png(curves: dict[str, dict]) -> bytes:
    """Reliability diagrams: accuracy against confidence per bin, before and after calibration,
    one panel per set (`curves`: set name -> {'calibrated': bins, 'uncalibrated': bins})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4.6), dpi=100)
    for ax, (title, pair) in zip(np.atleast_1d(axes), curves.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="lightgray", lw=1, label="perfect")
        for label, bins in pair.items():
            if bins["bins"]:
                x = [b["confidence"] for b in bins["bins"]]
                y = [b["accuracy"] for b in bins["bins"]]
                ax.plot(x, y, marker="o", ms=3, label=f"{label} (ECE {bins['ece']:.2%})")
        ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="confidence", ylabel="accuracy")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def evaluate_checkpoint(cfg) -> dict:
    """The `evaluate` stage: score the trained checkpoint, write metrics and plots, register it.

    Writes under `paths.eval_dir`: metrics.json, confusion.csv/png, misclassified.png,
    realworld_misses.png, reliability.csv/png and the candidate checkpoint (the trained one
    with its scores and registry version in its metadata).
    """
    out = Path(cfg.paths.eval_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, metadata = checkpoint.load(cfg.paths.checkpoint)
    fitted = scoring_of(metadata, cfg.paths.checkpoint)
    model_args = metadata.pop("model_args")
    run_id = metadata.get("mlflow_run_id")
    if run_id:  # trained with the MLflow logger: evaluate the same run, register the model
        tracking = Tracking.from_config(cfg)
        tracking.check()  # before anything is written

    images, labels = mnist.load(Path(cfg.paths.mnist), "t10k")
    test_answers = scoring.answers(model, fitted, images)
    probabilities = test_answers["probabilities"]
    test = score(probabilities, labels)
    fb_images, fb_labels = feedback.load(Path(cfg.paths.feedback), split="holdout")
    holdout = score(scoring.answers(model, fitted, fb_images)["probabilities"], fb_labels)
    digits, others = load_evalsets(Path(cfg.paths.evalsets))
    rw_answers = scoring.answers(model, fitted, digits["pixels"])
    realworld = realworld_report(rw_answers, digits, probabilities.argmax(axis=1) == labels)
    other_answers = scoring.answers(model, fitted, others["pixels"])

    metrics = {
        "test": {k: test[k] for k in ("accuracy", "loss", "errors", "count", "per_class_accuracy")}
        | calibration_report(test_answers, labels),
        "realworld": realworld | calibration_report(rw_answers, digits["labels"]),
        "feedback_holdout": {k: holdout.get(k) for k in ("accuracy", "count")},
        "ood": not_a_digit_report(
            test_answers, rw_answers, other_answers, others["categories"], fitted["threshold"]
        ),
    }
    Path(cfg.paths.metrics).write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / "confusion.csv", "w") as f:
        f.write("actual,predicted\n")
        predicted = probabilities.argmax(axis=1)
        f.writelines(f"{a},{p}\n" for a, p in zip(labels.tolist(), predicted.tolist(), strict=True))
    title = f"MNIST test: {test['accuracy']:.2%} ({test['errors']} errors)"
    (out / "confusion.png").write_bytes(confusion_png(test["confusion"], title))
    (out / "misclassified.png").write_bytes(misclassified_png(images, labels, probabilities))
    misses = misses_png(Path(cfg.paths.evalsets), digits, rw_answers["probabilities"])
    (out / "realworld_misses.png").write_bytes(misses)
    curves = {
        name: {
            "calibrated": scoring.calibration(answers["probabilities"], truth),
            "uncalibrated": scoring.calibration(answers["uncalibrated"], truth),
        }
        for name, answers, truth in (
            ("MNIST test", test_answers, labels),
            ("real-world digits", rw_answers, digits["labels"]),
        )
    }
    (out / "reliability.png").write_bytes(reliability_png(curves))
    with open(out / "reliability.csv", "w") as f:
        f.write("set,scores,confidence,accuracy,count\n")
        for name, pair in curves.items():
            for which, report in pair.items():
                f.writelines(
                    f"{name},{which},{b['confidence']:.6f},{b['accuracy']:.6f},{b['count']}\n"
                    for b in report["bins"]
                )

    ood = metrics["ood"]
    metadata.update(
        test_accuracy=test["accuracy"],
        test_loss=test["loss"],
        test_ece=metrics["test"]["ece"],
        ood_auroc=ood["auroc"],
        realworld_accuracy=realworld["accuracy"],
        feedback_holdout_accuracy=holdout["accuracy"],
        feedback_holdout_count=holdout["count"],
    )
    if run_id:
        scores = {
            "test/acc": test["accuracy"],
            "test/loss": test["loss"],
            "test/ece": metrics["test"]["ece"],
            "test/nll": metrics["test"]["nll"],
            "test/brier": metrics["test"]["brier"],
            "test/uncalibrated_ece": metrics["test"]["uncalibrated"]["ece"],
            "realworld/acc": realworld["accuracy"],
            "realworld/ece": metrics["realworld"]["ece"],
            **{f"realworld/{k}/acc": r["accuracy"] for k, r in realworld["per_kind"].items()},
            **{f"realworld/{k}/acc": r["accuracy"] for k, r in realworld["per_style"].items()},
            "ood/auroc": ood["auroc"],
            "ood/rejected": ood["rejected"],
            "ood/accepted_mnist_test": ood["accepted"]["mnist_test"],
            "ood/accepted_realworld": ood["accepted"]["realworld"],
        }
        for name, compared in ood["scores"].items():  # every score compared, as in metrics.json
            scores[f"ood/{name}/auroc"] = compared["auroc"]
            scores[f"ood/{name}/accepted_at_99"] = compared["accepted_at_99"]
        for category, share in ood["rejected_per_category"].items():
            scores[f"ood/rejected/{category}"] = share
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
                "test_ece": f"{metrics['test']['ece']:.4f}",
                "ood_auroc": f"{ood['auroc']:.4f}",
                "data_version": metadata.get("data_version"),
                "git_commit": metadata.get("git_commit"),
            },
        )
    checkpoint.save(cfg.paths.candidate, model, model_args, metadata)
    if run_id:
        # Serving rebuilds the model from this file (weights + args + metadata), not the pt2 graph.
        tracking.log_checkpoint(run_id, Path(cfg.paths.candidate))
    return metrics
