"""Calibration and the not-a-digit score (digitops.scoring): the statistics on data whose answer
is known, then the fitted scoring of the shipped model."""

import io

import numpy as np
import pytest
from PIL import Image

from digitops import checkpoint, scoring
from digitops.data import mnist
from digitops.inference.preprocess import Options, prepare


def overconfident(n: int = 20_000, factor: float = 3.0, seed: int = 0):
    """Logits `factor` times too sharp, and labels drawn from the true (unsharpened) softmax."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(0, 2.0, (n, 10))
    p = scoring.softmax(truth)
    labels = np.array([rng.choice(10, p=row) for row in p])
    return truth * factor, labels


def test_temperature_scaling_undoes_overconfidence_and_lowers_ece():
    logits, labels = overconfident()
    temperature = scoring.fit_temperature(logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    before = scoring.calibration(scoring.softmax(logits), labels)
    after = scoring.calibration(scoring.softmax(logits, temperature), labels)
    assert before["ece"] > 0.1 and after["ece"] < 0.02
    assert after["nll"] < before["nll"] and after["brier"] < before["brier"]


def test_ece_nll_and_brier_by_hand():
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    report = scoring.calibration(p, labels, bins=10)
    # Bin 0.9: said 90%, right 50%; bin 0.6: said 60%, right 100%; each half the samples.
    assert report["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert report["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.1, 0.6, 0.6])))
    assert report["brier"] == pytest.approx(np.mean([0.02, 1.62, 0.32, 0.32]))
    assert [b["count"] for b in report["bins"]] == [2, 2]


def test_auroc_counts_pairs_and_ties_half():
    assert scoring.auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert scoring.auroc(np.array([1.0]), np.array([2.0])) == 0.0
    assert scoring.auroc(np.array([1.0, 3.0]), np.array([1.0, 2.0])) == pytest.approx(0.625)


@pytest.fixture(scope="module")
def shipped():
    return checkpoint.load("models/default/model.pt")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_shipped_model_takes_digits_as_digits_and_a_blank_or_noise_as_not(shipped, mnist_dir):
    model, metadata = shipped
    fitted = metadata["scoring"]
    images, labels = mnist.load(mnist_dir, "t10k")
    noise = np.random.default_rng(0).integers(0, 256, (280, 280), dtype=np.uint8)
    others = np.stack(
        [prepare(png(x), Options()).pixels for x in (np.zeros((280, 280), np.uint8), noise)]
    )
    digits, non = (scoring.answers(model, fitted, x) for x in (images, others))
    assert ((digits["digit_score"] >= fitted["threshold"]).mean()) >= 0.98
    assert (non["digit_score"] < fitted["threshold"]).all()
    assert digits["digit_score"].min() >= 0 and digits["digit_score"].max() <= 1
    assert (digits["probabilities"].argmax(1) == labels).mean() > 0.99


def test_the_threshold_keeps_the_asked_share_of_validation_digits(shipped, mnist_dir):
    model, _ = shipped
    images, labels = mnist.load(mnist_dir, "train")
    val = (images[1000:], labels[1000:])
    fitted = scoring.fit(model, (images[:1000], labels[:1000]), val, keep=0.9)
    kept = scoring.answers(model, fitted, val[0])["digit_score"] >= fitted["threshold"]
    # 200 digits: a step is 0.005, and scores recomputed in other batches (other float
    # rounding) may move a digit or two right at the threshold across it.
    assert kept.mean() == pytest.approx(0.9, abs=0.015)
