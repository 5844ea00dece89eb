"""A real `bentoml serve` subprocess on 127.0.0.1: every endpoint, bad inputs, then stop."""

import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from digitops.data import mnist, notdigits, realworld
from tests.servers import bentoml_serve, store_model
from tests.test_service import bomb_png, png_bytes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


# Every request sampled by BentoML's own config (the service's section, which BentoML lets
# override the top-level `tracing`): only DIGITOPS_TRACING decides whether any is traced.
SAMPLE_ALL = {"BENTOML_CONFIG_OPTIONS": "services.digitops.tracing.sample_rate=1.0"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module: two workers, an admin token, tracing off, and feedback
    limited to 5 a minute per client (only the flood test sends any)."""
    settings = {
        **SAMPLE_ALL,
        "DIGITOPS_ADMIN_TOKEN": "s3cret",
        "DIGITOPS_WORKERS": "2",
        "DIGITOPS_FEEDBACK_PER_MINUTE": "5",
    }
    with bentoml_serve(tmp_path_factory.mktemp("serve"), **settings) as running:
        yield running


def test_every_endpoint_and_bad_inputs_on_a_real_server(server, mnist_dir):
    base, log = server
    images, labels = mnist.load(mnist_dir, "t10k")
    good = {"image": ("d.png", png_bytes(images[0]), "image/png")}
    with httpx.Client(base_url=base, timeout=30) as c:
        body = c.post("/predict", files=good).json()
        assert len(body["probabilities"]) == 10
        assert c.post("/explain", files=good).json()["cam"]
        widths = c.get("/model").json()["model_args"]["channels"]
        maps = c.post("/feature_maps", files=good, data={"layer": "conv3"}).json()
        assert maps["channels"] == widths[2]
        batch = [("images", (f"{i}.png", png_bytes(images[i]), "image/png")) for i in range(8)]
        assert c.post("/predict_batch", files=batch).json()["count"] == 8
        assert c.get("/model").json()["source"]
        assert "bentoml" in c.get("/metrics").text
        assert "/predict" in c.get("/docs.json").json()["paths"]

        bad = [
            ({"files": {"image": ("t.png", b"this is not an image", "image/png")}}, 400),
            ({"files": {"image": ("e.png", b"", "image/png")}}, 400),
            ({"files": {"image": ("b.png", bomb_png(), "image/png")}}, 413),
            ({"files": {"image": ("h.png", os.urandom(12 * 1024 * 1024), "image/png")}}, 413),
            ({"files": {"file": ("d.png", png_bytes(images[0]), "image/png")}}, 400),
            ({}, 400),
            ({"files": good, "data": {"invert": "sideways"}}, 400),
            ({"files": good, "data": {"noise": "7"}}, 400),
        ]
        for kwargs, status in bad:
            r = c.post("/predict", **kwargs)
            assert r.status_code == status, (kwargs.keys(), r.text)
            assert r.json()["error"]
        assert c.get("/readyz").status_code == 200
        assert c.post("/predict", files=good).status_code == 200
    assert "serving model from" in log.read_text()


def test_a_blank_canvas_a_drawn_letter_and_a_scribble_are_not_digits(server, mnist_dir):
    """Drawn as the web page's canvas exports them; a digit drawn the same way is a digit."""
    rng = np.random.default_rng(0)
    c, r = notdigits.SIDE / 2, notdigits.SIDE * 0.38
    letter_m = [(c - r, c + r), (c - r, c - r), (c, c + r / 5), (c + r, c - r), (c + r, c + r)]
    drawings = {
        "blank": notdigits._blank_canvas(rng),
        "letter M": realworld.render_canvas(notdigits._polyline_ink(letter_m, 12), rng),
        "scribble": realworld.render_canvas(notdigits._scribble(rng), rng),
        "digit": realworld.render_canvas(mnist.load(mnist_dir, "t10k")[0][0], rng),
    }
    base, _ = server
    with httpx.Client(base_url=base, timeout=30) as c:
        threshold = c.get("/model").json()["digit_threshold"]
        for name, image in drawings.items():
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            r = c.post("/predict", files={"image": (f"{name}.png", buffer.getvalue(), "image/png")})
            assert r.status_code == 200, (name, r.text)
            body = r.json()
            assert body["is_digit"] is (name == "digit"), (name, body["digit_score"])
            assert (body["digit_score"] >= threshold) is body["is_digit"]
            assert len(body["probabilities"]) == 10
        explained = c.post(
            "/explain",
            files={"image": ("b.png", png_bytes(np.zeros((28, 28), np.uint8)), "image/png")},
        )
        assert explained.json()["is_digit"] is False


def test_requests_are_traced_only_when_digitops_tracing_is_on(server, tmp_path, mnist_dir):
    """With every request sampled, the access log names each request's trace only when
    DIGITOPS_TRACING is on; off (the module's server), the OpenTelemetry middleware never ran
    for it (no trace at all), and the workers say why none is traced."""
    images, _ = mnist.load(mnist_dir, "t10k")
    good = {"image": ("d.png", png_bytes(images[0]), "image/png")}
    settings = {**SAMPLE_ALL, "DIGITOPS_TRACING": "true", "DIGITOPS_WORKERS": "1"}
    with bentoml_serve(tmp_path, **settings) as traced:
        for tracing, (base, log) in ((True, traced), (False, server)):
            assert httpx.post(f"{base}/predict", files=good, timeout=30).status_code == 200
            deadline = time.monotonic() + 10  # a line reaches the log a moment after its reply
            while "path=/predict" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            lines = log.read_text().splitlines()
            requests = [line for line in lines if "path=/predict" in line]
            assert requests
            assert all(
                ("sampled=1" in r) == tracing and ("trace=" in r) == tracing for r in requests
            )
            assert any("DIGITOPS_TRACING is off" in line for line in lines) != tracing


def test_an_idle_kept_alive_connection_outlives_bentomls_default_timeout(server, mnist_dir):
    """A connection idle longer than BentoML's default keep-alive (5 s) is still open: a client
    reusing it must never meet a server that is just closing it (KEEP_ALIVE_SECONDS)."""
    base, log = server
    images, _ = mnist.load(mnist_dir, "t10k")
    good = {"image": ("d.png", png_bytes(images[0]), "image/png")}
    limits = httpx.Limits(keepalive_expiry=60)  # httpx's own default would drop it at 5 s
    seen = len(log.read_text().splitlines())
    with httpx.Client(base_url=base, timeout=30, limits=limits) as c:
        assert c.post("/predict", files=good).status_code == 200
        time.sleep(6)
        assert c.post("/predict", files=good).status_code == 200
    # The access log names each request's client address: one connection served both. (A line
    # reaches the log file a moment after its reply.)
    deadline = time.monotonic() + 10
    while True:
        lines = log.read_text().splitlines()[seen:]
        requests = [line for line in lines if "path=/predict" in line]
        if len(requests) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    clients = {line.split(" (scheme=")[0].rsplit(" ", 1)[1] for line in requests}
    assert len(requests) == 2 and len(clients) == 1, "the server closed the idle connection"


def test_concurrent_requests_get_their_own_answers(server, mnist_dir):
    """Many clients at once, each request's work in its own thread: every reply matches its own
    image."""
    import concurrent.futures

    base, _ = server
    images, _ = mnist.load(mnist_dir, "t10k")
    with httpx.Client(base_url=base, timeout=60) as c:
        expected = [
            c.post(
                "/predict", files={"image": ("d.png", png_bytes(images[i]), "image/png")}
            ).json()["probabilities"]
            for i in range(16)
        ]

        def ask(i):
            files = {"image": ("d.png", png_bytes(images[i % 16]), "image/png")}
            return i % 16, c.post("/predict", files=files).json()["probabilities"]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for i, probs in pool.map(ask, range(64)):
                assert probs == pytest.approx(expected[i], abs=1e-4)


def test_feedback_flood_is_rate_limited(server, mnist_dir):
    images, _ = mnist.load(mnist_dir, "t10k")
    files = {"image": ("d.png", png_bytes(images[0]), "image/png")}
    with httpx.Client(base_url=server[0], timeout=30) as c:
        pid = c.post("/predict", files=files).json()["prediction_id"]
        feedback = {"prediction_id": pid, "label": 1}
        codes = [c.post("/feedback", json=feedback).status_code for _ in range(8)]
        assert codes == [200] * 5 + [429] * 3
        assert c.post("/predict", files=files).status_code == 200, "predictions are not limited"


def test_unwritable_store_keeps_predicting_and_says_why(tmp_path, mnist_dir):
    images, _ = mnist.load(mnist_dir, "t10k")
    (tmp_path / "blocker").write_text("")  # a file where the store's folder should be
    with bentoml_serve(tmp_path, DIGITOPS_PREDICTIONS_DB=str(tmp_path / "blocker" / "p.db")) as (
        base,
        log,
    ):
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.post("/predict", files={"image": ("d.png", png_bytes(images[0]), "image/png")})
            assert r.status_code == 200 and r.json()["logged"] is False
            r = c.post("/feedback", json={"prediction_id": "x", "label": 1})
            assert r.status_code == 503 and "store" in r.json()["error"]
        assert "cannot be opened" in log.read_text()


def test_admin_reload_switches_every_worker_with_no_failed_requests(server, mnist_dir):
    """Last in the module: the module's server serves another model afterwards."""
    import concurrent.futures

    images, _ = mnist.load(mnist_dir, "t10k")
    base, log = server
    # Put a model in the server's BentoML store, then ask the running server to switch.
    shipped = (ROOT / "models" / "default" / "model.pt").read_bytes()
    store_model(log.parent / "bentoml_home", shipped, {"mlflow_version": "test"})

    def sources() -> set[str]:
        # A new connection per request, so that both workers answer.
        return {
            httpx.get(f"{base}/model", timeout=30).json()["source"].split()[0] for _ in range(20)
        }

    with httpx.Client(base_url=base, timeout=30) as c:
        assert c.post("/admin/reload").status_code == 401
        assert sources() == {"shipped"}
        files = {"image": ("d.png", png_bytes(images[0]), "image/png")}

        def hammer(_):
            return httpx.post(f"{base}/predict", files=files, timeout=30).status_code

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = pool.map(hammer, range(60))
            reload = c.post("/admin/reload", headers={"authorization": "Bearer s3cret"})
            codes = list(codes)
        assert reload.status_code == 200, reload.text
        assert reload.json()["current"]["source"].startswith("bentoml model store")
        assert codes == [200] * 60
    # The worker that took the reload announces it; the other follows within a second.
    deadline = time.monotonic() + 10
    while (seen := sources()) != {"bentoml"} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert seen == {"bentoml"}


def test_drift_turns_into_a_warning_in_the_log_and_the_gauges(tmp_path, mnist_dir):
    """The Monitor's thread refreshes the gauges every second here (60 by default); rotated
    digits after plain ones are drift: a warning in the log, on /monitor and on /metrics."""
    from tests.test_monitor import rotated

    images, _ = mnist.load(mnist_dir, "t10k")
    settings = {"DIGITOPS_WORKERS": "1", "DIGITOPS_MONITOR_SECONDS": "1"}
    with bentoml_serve(tmp_path, **settings) as (base, log), httpx.Client(base_url=base) as c:

        def send(pixels) -> None:
            files = [
                ("images", (f"{i}.png", png_bytes(p), "image/png")) for i, p in enumerate(pixels)
            ]
            assert c.post("/predict_batch", files=files, timeout=60).status_code == 200

        def gauge(name: str) -> float | None:  # None until the first refresh sets it
            for line in c.get("/metrics").text.splitlines():
                if line.startswith(f"digitops_monitor_{name} "):
                    return float(line.split()[1])
            return None

        def settled(check) -> bool:
            deadline = time.monotonic() + 10
            while not check() and time.monotonic() < deadline:
                time.sleep(0.2)
            return check()

        send(images[:200])
        assert settled(lambda: gauge("predictions") == 200)
        assert gauge("drift") == 0 and gauge("warnings") == 0 and gauge("estimated_accuracy") > 0.95
        send([rotated(p) for p in images[:200]])
        assert settled(lambda: gauge("drift") == 1)
        assert "monitor: input drift: embeddings" in log.read_text()
        body = c.get("/monitor").json()
        assert body["status"] == "warning" and body["warnings"][0].startswith("input drift")
