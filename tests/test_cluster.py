"""The many-machine deployment on loopback (`python -m deploy.cluster`): two replicas
behind nginx share the work and one PostgreSQL store, survive one replica dying, and `down`
leaves nothing running."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from deploy.cluster import Process, alive, port_in_use
from digitops.data import mnist
from tests.conftest import canvas_png
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = [sys.executable, "-m", "deploy.cluster"]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def cluster(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLUSTER, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.timeout(900)
def test_two_replicas_behind_nginx_share_one_store_and_stop_cleanly(mnist_dir):
    # PostgreSQL runs as `postgres` and must reach its folder: not pytest's 0700 tmp_path.
    directory = Path(tempfile.mkdtemp(prefix="digitops-cluster-"))
    directory.chmod(0o755)
    port = free_port()
    # An empty BentoML home: every replica serves the shipped model.
    env = {**os.environ, "BENTOML_HOME": str(directory / "bentoml_home")}
    images, _ = mnist.load(mnist_dir, "t10k")
    digits = [canvas_png(images[i]) for i in range(16)]
    try:
        up = cluster("up", "--replicas", "2", "--port", str(port), "--dir", str(directory), env=env)
        assert up.returncode == 0, up.stderr
        assert len(up.stdout.splitlines()) == 5  # postgres, mlflow, 2 replicas, nginx
        state = json.loads((directory / "cluster.json").read_text())
        records = [Process(**p) for p in [state["postgres"], *state["processes"]]]
        replicas = [p for p in records if p.name.startswith("replica")]
        # Every process each server started (BentoML's workers run in sessions of their own).
        trees = [t for p in records for t in [p.handle(), *p.handle().children(recursive=True)]]

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            replies = [
                client.post("/predict", files={"image": ("d.png", png, "image/png")})
                for png in digits * 2
            ]
            assert [r.status_code for r in replies] == [200] * len(replies)
            assert all(r.json().get("logged", True) for r in replies)
            answered = {r.headers["X-Upstream"] for r in replies}
            assert answered == {f"127.0.0.1:{r.port}" for r in replicas}
            # One store behind both: each replica counts the predictions the other logged too,
            # once the other's log writer has committed them (every 50 ms).
            deadline = time.monotonic() + 5
            while True:
                counts = [
                    httpx.get(f"{r.url}/feedback/stats").json()["predictions"] for r in replicas
                ]
                if counts == [len(replies)] * 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert counts == [len(replies)] * 2

            # A replica dies: a POST that never reached it (connection refused) goes to the
            # other, so no client sees the failure.
            dead = replicas[1].handle()
            for proc in [dead, *dead.children(recursive=True)]:
                proc.kill()
            psutil.wait_procs([dead], timeout=30)
            after = [
                client.post("/predict", files={"image": ("d.png", png, "image/png")})
                for png in digits
            ]
            assert [r.status_code for r in after] == [200] * len(after)
    finally:
        down = cluster("down", "--dir", str(directory))
    assert down.returncode == 0, down.stderr
    assert not [t for t in trees if alive(t)]
    assert all(p.handle() is None for p in records)
    assert not [p.port for p in records if port_in_use(p.port)]
    assert cluster("down", "--dir", str(directory)).returncode == 0  # a second `down` is harmless
    # One access log, at the edge: nginx's has every request; the replicas write none.
    logs = directory / "logs"
    assert (logs / "nginx-access.log").read_text().count("POST /predict") == 3 * len(digits)
    for replica in replicas:
        assert "path=/predict" not in (logs / f"{replica.name}.log").read_text()
    shutil.rmtree(directory, ignore_errors=True)


# As README.md ("Running on many machines") shows them, run from the checkout as written.
README_COMMANDS = (
    "make cluster-up",
    "python -m deploy.cluster status",
    "make cluster-down",
)


@pytest.mark.timeout(900)
def test_the_readme_commands_start_query_and_stop_the_default_cluster(mnist_dir):
    readme = (ROOT / "README.md").read_text()
    assert all(command in readme for command in README_COMMANDS)
    assert not port_in_use(8080), "something else listens on 8080, the default nginx port"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def sh(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            command.split(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )

    images, _ = mnist.load(mnist_dir, "t10k")
    up, status, down = README_COMMANDS
    try:
        started = sh(up)
        assert started.returncode == 0, started.stdout + started.stderr
        listed = sh(status)
        assert listed.returncode == 0 and "nginx" in listed.stdout, listed.stdout
        files = {"image": ("d.png", canvas_png(images[0]), "image/png")}
        reply = httpx.post("http://127.0.0.1:8080/predict", files=files, timeout=30)
        assert reply.status_code == 200 and reply.json()["digit"] in range(10)
    finally:
        stopped = sh(down)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert sh(status).returncode == 3  # nothing runs
    assert not port_in_use(8080)
