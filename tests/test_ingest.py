"""Feedback ingestion: validation, de-duplication, quarantine, and exactly-once under SIGKILL."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from digitops.data import feedback, mnist
from digitops.data.ingest import ingest
from digitops.inference.store import PredictionStore
from digitops.inference.store import feedback as feedback_table
from tests.conftest import log_prediction

ROOT = Path(__file__).resolve().parents[1]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def labelled(store: PredictionStore, pid: str, pixels: np.ndarray, label: int) -> None:
    log_prediction(store, pid, png(pixels), np.full(10, 0.1), False, "1")
    store.add_feedback(pid, label)


@pytest.fixture
def digits(mnist_dir):
    return mnist.load(mnist_dir, "t10k")


def test_validates_merges_and_quarantines(tmp_path, digits, store_location):
    images, labels = digits
    store = PredictionStore(store_location)
    for i in range(5):
        labelled(store, f"ok{i}", images[i], int(labels[i]))
    labelled(store, "dup", images[0], int(labels[0]))  # same image, same label
    labelled(store, "conflict", images[1], (int(labels[1]) + 1) % 10)  # same image, other label
    labelled(store, "blank", np.zeros((28, 28), np.uint8), 3)
    log_prediction(store, "garbage", b"not a png", np.full(10, 0.1), False, "1")
    store.add_feedback("garbage", 4)

    summary = ingest(store, tmp_path / "feedback")
    assert (summary.accepted, summary.merged) == (5, 1)
    assert summary.quarantined == {
        "conflicting labels": 1,
        "blank image": 1,
        "image does not decode": 1,
    }
    records = feedback.read_manifest(tmp_path / "feedback")
    assert sorted(r["prediction_id"] for r in records) == [f"ok{i}" for i in range(5)]
    x, y = feedback.load(tmp_path / "feedback")
    assert np.array_equal(np.sort(y), np.sort(labels[:5]))
    assert store.stats() == {"pending": 0, "ingested": 6, "rejected": 3, "predictions": 9}
    c = feedback_table.c
    with store.engine.connect() as conn:
        query = sa.select(c.prediction_id, c.reason).where(c.status == "rejected")
        reasons = dict(conn.execute(query).all())
    assert "from prediction ok1" in reasons["conflict"]

    # Nothing new: a rerun changes nothing.
    assert ingest(store, tmp_path / "feedback").accepted == 0


def test_not_a_digit_is_kept_apart_from_the_digits(tmp_path, digits, store_location):
    """A blank or a letter marked "not a digit" is a good example of that, never of a digit:
    ingested with its own label, and left out of what training and evaluation load as digits."""
    images, labels = digits
    store = PredictionStore(store_location)
    labelled(store, "seven", images[0], int(labels[0]))
    labelled(store, "blank", np.zeros((28, 28), np.uint8), feedback.NOT_A_DIGIT)
    scribble = np.zeros((28, 28), np.uint8)
    scribble[4:24, 6:22:3] = 255
    labelled(store, "scribble", scribble, feedback.NOT_A_DIGIT)
    summary = ingest(store, tmp_path / "feedback")
    assert summary.accepted == 3 and not summary.quarantined
    _, digit_labels = feedback.load(tmp_path / "feedback")
    others, other_labels = feedback.load(tmp_path / "feedback", digits=False)
    assert digit_labels.tolist() == [labels[0]]
    assert len(others) == 2 and set(other_labels) == {feedback.NOT_A_DIGIT}


def test_changed_mind_after_ingestion_relabels_the_sample(tmp_path, digits, store_location):
    images, _ = digits
    store = PredictionStore(store_location)
    labelled(store, "p", images[0], 1)
    ingest(store, tmp_path / "feedback")
    store.add_feedback("p", 7)
    summary = ingest(store, tmp_path / "feedback")
    assert summary.relabelled == 1
    (record,) = feedback.read_manifest(tmp_path / "feedback")
    assert record["label"] == 7


KILLABLE = """
import sys
from pathlib import Path
from digitops.data.ingest import ingest
from digitops.inference.store import PredictionStore
print(ingest(PredictionStore(sys.argv[1]), Path(sys.argv[2])), flush=True)
"""


@pytest.mark.parametrize(
    "crashes",
    [
        # (failpoint, n-th pass): killed after an image file, after a manifest line, and
        # repeatedly at different places before a run finally completes.
        [("image", 1)],
        [("manifest", 1)],
        [("image", 7), ("manifest", 3), ("image", 10), ("manifest", 5)],
    ],
)
def test_sigkill_at_any_point_neither_loses_nor_duplicates(
    tmp_path, digits, crashes, store_location
):
    images, labels = digits
    store = PredictionStore(store_location)
    n = 40
    for i in range(n):
        labelled(store, f"p{i}", images[i], int(labels[i]))
    store.close()
    out = tmp_path / "feedback"
    cmd = [sys.executable, "-c", KILLABLE, store_location, str(out)]
    for point, nth in crashes:
        env = {**os.environ, "DIGITOPS_FAILPOINT": f"{point}:{nth}"}
        killed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=120)
        assert killed.returncode == -signal.SIGKILL
        # After every kill the manifest is readable and holds no sample twice.
        lines = (out / feedback.MANIFEST).read_text().splitlines()
        records = feedback.read_manifest(out)
        assert len(lines) == len(records) == len({json.loads(x)["sha256"] for x in lines})
    final = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert "accepted" in final.stdout
    store = PredictionStore(store_location)
    records = feedback.read_manifest(out)
    # MNIST's first test digits are all distinct images: every one lands exactly once.
    assert sorted(r["prediction_id"] for r in records) == sorted(f"p{i}" for i in range(n))
    assert store.stats()["pending"] == 0 and store.stats()["ingested"] == n
    assert not list((out / feedback.IMAGES).glob("*.part"))
    assert len(list((out / feedback.IMAGES).glob("*.png"))) == n


def test_a_second_concurrent_run_is_refused(tmp_path, store_location):
    import fcntl

    from digitops.data.ingest import LOCK, IngestBusy

    out = tmp_path / "feedback"
    out.mkdir()
    with open(out / LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(IngestBusy):
            ingest(PredictionStore(store_location), out)
