"""Faults a service meets in production, each survived: a killed server, a full disk, a broken
model file, a tracking server that is down."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from digitops import checkpoint
from digitops.data import mnist
from digitops.model import DigitCNN
from tests.servers import PROCESSES, bentoml_serve, free_port, kill_tree, store_model
from tests.test_service import png_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_sigkill_during_feedback_loses_no_acknowledged_correction(tmp_path, mnist_dir):
    images, labels = mnist.load(mnist_dir, "t10k")
    acknowledged: dict[str, int] = {}
    with bentoml_serve(tmp_path, DIGITOPS_FEEDBACK_PER_MINUTE="100000") as (base, _):
        ids = []
        with httpx.Client(base_url=base, timeout=60) as c:
            for start in range(0, 300, 100):
                batch = [
                    ("images", (f"{i}.png", png_bytes(images[i], size=28), "image/png"))
                    for i in range(start, start + 100)
                ]
                results = c.post("/predict_batch", files=batch).json()["results"]
                ids += [r["prediction_id"] for r in results]

        def correct(i: int) -> None:
            reply = httpx.post(
                f"{base}/feedback",
                json={"prediction_id": ids[i], "label": int(labels[i])},
                timeout=30,
            )
            if reply.status_code == 200:  # only an answered request counts as acknowledged
                acknowledged[ids[i]] = int(labels[i])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(correct, i) for i in range(len(ids))]
            while len(acknowledged) < 30:
                time.sleep(0.001)
            kill_tree(PROCESSES[base])  # mid-burst, no shutdown
            for future in futures:
                with contextlib.suppress(httpx.HTTPError):
                    future.result()
    assert 30 <= len(acknowledged) < len(ids), "the kill must land inside the burst"

    db = sqlite3.connect(tmp_path / "predictions.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = dict(db.execute("SELECT prediction_id, label FROM feedback").fetchall())
    db.close()
    assert acknowledged.items() <= stored.items()
    # And a restarted server opens the same store and goes on.
    with bentoml_serve(tmp_path) as (base, _), httpx.Client(base_url=base, timeout=30) as c:
        assert c.get("/feedback/stats").json()["pending"] == len(stored)
        reply = c.post("/feedback", json={"prediction_id": ids[-1], "label": int(labels[-1])})
        assert reply.status_code == 200


@pytest.mark.e2e
def test_sigkill_mid_load_loses_no_prediction_answered_as_logged(tmp_path, mnist_dir):
    """A reply that does not say `logged: false` was journaled before it went out: killed
    mid-load, the server has every such prediction in its store once it starts again."""
    images, _ = mnist.load(mnist_dir, "t10k")
    pngs = [png_bytes(images[i]) for i in range(8)]
    answered: list[dict] = []
    with bentoml_serve(tmp_path) as (base, _):

        def predict(i: int) -> None:
            with contextlib.suppress(httpx.HTTPError):
                files = {"image": ("d.png", pngs[i % len(pngs)], "image/png")}
                reply = httpx.post(base + "/predict", files=files, timeout=30)
                if reply.status_code == 200:
                    answered.append(reply.json())

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(predict, i) for i in range(200)]
            deadline = time.monotonic() + 60
            while len(answered) < 30 and time.monotonic() < deadline:
                time.sleep(0.01)
            kill_tree(PROCESSES[base])
            concurrent.futures.wait(pending)
    logged = {r["prediction_id"] for r in answered if "logged" not in r}
    assert len(logged) >= 30
    with bentoml_serve(tmp_path) as (base, _), httpx.Client(base_url=base, timeout=30) as c:
        reply = c.post("/feedback", json={"prediction_id": sorted(logged)[-1], "label": 7})
        assert reply.status_code == 200
    with contextlib.closing(sqlite3.connect(tmp_path / "predictions.db")) as db:
        assert logged <= {i for (i,) in db.execute("SELECT id FROM predictions")}


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB file system of its own, to fill up. Mounting needs root (CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.e2e
def test_a_full_disk_keeps_predicting_and_refuses_feedback_until_there_is_room(
    tmp_path, small_disk, mnist_dir
):
    images, _ = mnist.load(mnist_dir, "t10k")
    env = {"DIGITOPS_PREDICTIONS_DB": str(small_disk / "p.db")}
    with (
        bentoml_serve(tmp_path, **env) as (base, log),
        httpx.Client(base_url=base, timeout=30) as c,
    ):

        def predict(i: int) -> dict:
            files = {"image": ("d.png", png_bytes(images[i]), "image/png")}
            reply = c.post("/predict", files=files)
            assert reply.status_code == 200
            return reply.json()

        first = predict(0)["prediction_id"]
        filler = small_disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:  # take every free byte
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        full = [predict(i) for i in range(1, 40)]
        assert any(p.get("logged") is False for p in full), "the disk never filled"
        reply = c.post("/feedback", json={"prediction_id": first, "label": 7})
        assert reply.status_code == 503 and "retry" in reply.json()["error"]
        assert "digitops_store_write_failures_total" in c.get("/metrics").text

        filler.unlink()  # room again: the same server writes again, no restart
        assert "logged" not in predict(40)
        assert c.post("/feedback", json={"prediction_id": first, "label": 7}).status_code == 200
    assert "full" in log.read_text()


def serve_until_exit(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`bentoml serve` that is expected to refuse to start."""
    return subprocess.run(
        ["bentoml", "serve", "serving.service:DigitService", "--port", str(free_port())],
        cwd=ROOT,
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "BENTOML_HOME": str(tmp_path / "bentoml_home"),
            "DIGITOPS_PREDICTIONS_DB": str(tmp_path / "p.db"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.e2e
def test_a_truncated_model_in_the_store_stops_the_server_with_one_line(tmp_path):
    shipped = (ROOT / "models" / "default" / "model.pt").read_bytes()
    store_model(tmp_path / "bentoml_home", shipped[:5000])
    out = serve_until_exit(tmp_path)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("digitops: cannot start:") and "not a loadable" in last, out.stderr


@pytest.mark.e2e
def test_a_bad_setting_stops_the_server_with_one_line_naming_it(tmp_path):
    out = serve_until_exit(tmp_path, DIGITOPS_WORKERS="two")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "digitops: DIGITOPS_WORKERS: input should be a valid integer, unable to parse string as "
        "an integer, got 'two'"
    ]


@pytest.mark.e2e
def test_reload_to_a_truncated_model_is_refused_and_the_old_one_keeps_serving(tmp_path, mnist_dir):
    images, _ = mnist.load(mnist_dir, "t10k")
    files = {"image": ("d.png", png_bytes(images[0]), "image/png")}
    token = {"authorization": "Bearer t0ken"}
    with bentoml_serve(tmp_path, DIGITOPS_ADMIN_TOKEN="t0ken") as (base, log):
        store_model(tmp_path / "bentoml_home", b"PK\x03\x04 not really a checkpoint")
        with httpx.Client(base_url=base, timeout=30) as c:
            reply = c.post("/admin/reload", headers=token)
            assert reply.status_code == 503
            assert "still serving shipped" in reply.json()["error"]
            assert "not a loadable digitops checkpoint" in reply.json()["error"]
            assert c.get("/model").json()["source"].startswith("shipped")
            assert c.post("/predict", files=files).status_code == 200
    assert "t0ken" not in log.read_text(), "the admin token must never reach the log"


def test_checkpoint_load_refuses_truncated_and_foreign_files(tmp_path):
    good = checkpoint.save(tmp_path / "good.pt", DigitCNN(), {}, {"a": 1})
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:3000])
    (tmp_path / "text.pt").write_text("hello")
    for name in ("cut.pt", "text.pt"):
        with pytest.raises(checkpoint.CheckpointError, match="not a loadable digitops checkpoint"):
            checkpoint.load(tmp_path / name)


def test_promote_with_the_tracking_server_down_fails_in_one_line_and_changes_nothing(
    tmp_path, mnist_dir
):
    candidate = checkpoint.save(
        tmp_path / "candidate.pt", DigitCNN(), {}, {"registered_version": "1"}
    )
    decision = tmp_path / "promotion.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.promote",
            f"paths.candidate={candidate}",
            f"paths.promotion={decision}",
            f"paths.mnist={mnist_dir}",
            f"paths.feedback={tmp_path / 'feedback'}",
            f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("promote: MLflow tracking server http")
    assert "unreachable" in out.stderr and "Traceback" not in out.stderr
    assert not decision.exists()
