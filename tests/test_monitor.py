"""The Monitor: known traffic replayed through the real prediction path (preprocessing, the
shipped model, the prediction log) moves its figures the way it should."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from digitops import checkpoint, monitoring
from digitops.data import mnist, notdigits
from digitops.inference import monitor
from digitops.inference.metrics import ServiceMetrics
from digitops.inference.preprocess import Options
from digitops.inference.served import ServedModel
from digitops.inference.store import PredictionStore
from digitops.model import fold_batchnorm
from tests.test_predictor import Job, run, thread_for


@pytest.fixture(scope="module")
def served() -> ServedModel:
    model, metadata = checkpoint.load("models/default/model.pt")
    return ServedModel(fold_batchnorm(model), metadata, "shipped models/default/model.pt")


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((140, 140), Image.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def rotated(pixels: np.ndarray, degrees: float = 40) -> np.ndarray:
    turn = cv2.getRotationMatrix2D((14, 14), degrees, 1)
    return cv2.warpAffine(pixels, turn, (28, 28))


def not_digits(count: int) -> list[bytes]:
    images = []
    for i in range(count):
        rng = np.random.default_rng([7, i])
        image, _ = notdigits.draw(("shapes", "scribbles")[i % 2], rng, [], None)
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        images.append(buf.getvalue())
    return images


def replay(thread, served, images: list[bytes]) -> list[dict]:
    ((replies),) = run(thread, Job(images, Options(), served, alone=False))
    assert all("error" not in r and r.get("logged", True) for r in replies)
    return replies


def test_drift_and_estimated_accuracy_follow_the_traffic_and_labels_are_counted(
    tmp_path, mnist_dir, served
):
    store = PredictionStore(tmp_path / "p.db")
    thread, _ = thread_for(store)
    images, labels = mnist.load(mnist_dir, "t10k")
    n = monitoring.WINDOW

    def figures() -> dict:
        thread.journal.flush()
        return monitor.report(store, served)

    plain = replay(thread, served, [png(p) for p in images[:n]])
    calm = figures()
    assert calm["drift"]["inputs"] == n and calm["status"] == "ok", calm["warnings"]
    assert "drift: none" in calm["headline"]
    reference = calm["reference"]["estimated_accuracy"]
    current = calm["versions"][0]
    assert current["serving"] and current["predictions"] == n
    assert current["estimated_accuracy"] > reference - 0.02

    # Feedback on the plain digits: the measured accuracy is exactly what the labels say.
    answered = [(r, int(y)) for r, y in zip(plain, labels[:n], strict=True) if r["is_digit"]]
    for reply, label in answered[:150]:
        store.add_feedback(reply["prediction_id"], label)
    right = sum(reply["digit"] == label for reply, label in answered[:150])
    measured = figures()["versions"][0]["measured"]
    assert measured["labels"] == 150 and measured["accuracy"] == pytest.approx(right / 150)
    assert measured["low"] <= right / 150 <= measured["high"]

    # The same digits turned by 40 degrees: drift, and the model knows it is less sure.
    turned_replies = replay(thread, served, [png(rotated(p)) for p in images[:n]])
    turned = figures()
    assert turned["status"] == "warning"
    assert turned["drift"]["embedding"]["score"] > 0.015 > calm["drift"]["embedding"]["score"]
    assert turned["drift"]["embedding"]["p_value"] < monitoring.P_VALUE
    assert any(w.startswith("input drift") for w in turned["warnings"])
    window = turned["versions"][0]["buckets"][-1]
    assert window["predictions"] == 2 * n
    assert turned["versions"][0]["estimated_accuracy"] < current["estimated_accuracy"] - 0.02
    assert any(w.startswith("estimated accuracy") for w in turned["warnings"])
    # Their labels bring the measured accuracy down too, significantly: another warning.
    for reply, label in zip(turned_replies, labels[:n], strict=True):
        if reply["is_digit"]:
            store.add_feedback(reply["prediction_id"], int(label))
    assert any(w.startswith("measured accuracy") for w in figures()["warnings"])

    # Then inputs that are no digit at all.
    replay(thread, served, not_digits(n))
    shapes = figures()
    assert shapes["drift"]["embedding"]["score"] > 0.015
    assert shapes["versions"][0]["not_digit_share"] > turned["versions"][0]["not_digit_share"]
    assert "drift: embeddings" in shapes["headline"]

    # The same figures as Prometheus gauges.
    registry = CollectorRegistry()
    ServiceMetrics(registry=registry).show(shapes)
    value = registry.get_sample_value
    assert value("digitops_monitor_drift") == 1 and value("digitops_monitor_predictions") == 3 * n
    assert value("digitops_monitor_labels") == shapes["versions"][0]["measured"]["labels"]
    assert value("digitops_monitor_warnings") == len(shapes["warnings"]) >= 2


def test_stress_tests_are_left_out_and_versions_are_apart(tmp_path, mnist_dir, served):
    """Inputs sent with noise on purpose say nothing about the traffic; an older version's
    predictions are counted as its own."""
    store = PredictionStore(tmp_path / "p.db")
    thread, _ = thread_for(store)
    images, _ = mnist.load(mnist_dir, "t10k")
    replay(thread, served, [png(p) for p in images[:10]])
    run(thread, Job([png(images[0])] * 5, Options(noise=0.5), served, alone=False))
    store.insert([store.record("old1", png(images[0]), [0.1] * 10, False, "3", stats=(0, 0, 0))])
    thread.journal.flush()
    figures = monitor.report(store, served)
    counts = {v["version"]: (v["predictions"], v["serving"]) for v in figures["versions"]}
    assert counts == {served.identity()["version"]: (10, True), "3": (1, False)}
    assert figures["drift"] is None  # too few inputs to say


def test_mmd_permutation_test_is_calibrated_on_one_distribution():
    rng = np.random.default_rng(0)
    p_values = [
        monitoring.mmd_test(rng.normal(size=(60, 4)), rng.normal(size=(60, 4)), 8.0, seed=s)[1]
        for s in range(40)
    ]
    # Under the null the p-value is uniform: about a tenth below 0.1, and never all small.
    assert 0.0 <= np.mean(np.array(p_values) < 0.1) <= 0.25
    shifted = monitoring.mmd_test(rng.normal(size=(60, 4)), rng.normal(0.8, size=(60, 4)), 8.0)
    assert shifted[1] < 0.01
