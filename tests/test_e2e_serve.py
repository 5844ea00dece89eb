"""A real `bentoml serve` subprocess on 127.0.0.1: every endpoint, bad inputs, then stop."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from digitops import mnist
from tests.test_service import bomb_png, png_bytes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml_home")),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bentoml", "serve", "serving.service:DigitService", "--host", "127.0.0.1",
             "--port", str(port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    else:
        pytest.fail(f"server not ready in 120 s:\n{log.read_text()[-3000:]}")
    yield base, log
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_every_endpoint_and_bad_inputs_on_a_real_server(server, mnist_dir):
    base, log = server
    images, labels = mnist.load(mnist_dir, "t10k")
    good = {"image": ("d.png", png_bytes(images[0]), "image/png")}
    with httpx.Client(base_url=base, timeout=30) as c:
        body = c.post("/predict", files=good).json()
        assert len(body["probabilities"]) == 10
        assert c.post("/explain", files=good).json()["cam"]
        assert c.post("/feature_maps", files=good, data={"layer": "conv3"}).json()["channels"] == 128
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


def test_concurrent_requests_get_their_own_answers(server, mnist_dir):
    """Many clients at once, through adaptive batching: every reply matches its own image."""
    import concurrent.futures

    base, _ = server
    images, _ = mnist.load(mnist_dir, "t10k")
    with httpx.Client(base_url=base, timeout=60) as c:
        expected = [c.post("/predict", files={"image": ("d.png", png_bytes(images[i]), "image/png")})
                    .json()["probabilities"] for i in range(16)]

        def ask(i):
            files = {"image": ("d.png", png_bytes(images[i % 16]), "image/png")}
            return i % 16, c.post("/predict", files=files).json()["probabilities"]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for i, probs in pool.map(ask, range(64)):
                assert probs == pytest.approx(expected[i], abs=1e-4)
