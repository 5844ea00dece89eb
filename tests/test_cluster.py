"""The many-machine deployment on loopback (`python -m deploy.cluster`): two replicas
behind nginx share the work and one PostgreSQL store, survive one replica dying, and `down`
leaves nothing running."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from deploy.cluster import Process, alive, port_in_use
from digitops.data import mnist
from tests.conftest import canvas_png

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = [sys.executable, "-m", "deploy.cluster"]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def cluster(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLUSTER, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


# As README.md ("Running on many machines") shows them, run from the checkout as written.
README_COMMANDS = (
    "make cluster-up",
    "python -m deploy.cluster status",
    "make cluster-down",
)
DIRECTORY = ROOT / "var" / "cluster"  # the default --dir


def requests_in(access_log: Path) -> int:
    return access_log.read_text().count("POST /predict") if access_log.exists() else 0


@pytest.mark.timeout(900)
def test_the_readme_cluster_shares_the_work_and_one_store_survives_a_replica_and_stops(mnist_dir):
    """`make cluster-up`: two replicas behind nginx share the work and one PostgreSQL store, a
    replica's death costs no client a request, and `make cluster-down` leaves nothing running."""
    readme = (ROOT / "README.md").read_text()
    assert all(command in readme for command in README_COMMANDS)
    assert not port_in_use(8080), "something else listens on 8080, the default nginx port"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def sh(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            command.split(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )

    images, _ = mnist.load(mnist_dir, "t10k")
    digits = [canvas_png(images[i]) for i in range(16)]
    up, status, down = README_COMMANDS
    try:
        started = sh(up)
        assert started.returncode == 0, started.stdout + started.stderr
        listed = sh(status)
        assert listed.returncode == 0 and "nginx" in listed.stdout, listed.stdout
        state = json.loads((DIRECTORY / "cluster.json").read_text())
        records = [Process(**p) for p in [state["postgres"], *state["processes"]]]
        assert len(records) == 5  # postgres, mlflow, 2 replicas, nginx
        replicas = [p for p in records if p.name.startswith("replica")]
        # Every process each server started (BentoML's workers run in sessions of their own).
        trees = [t for p in records for t in [p.handle(), *p.handle().children(recursive=True)]]

        access_log = DIRECTORY / "logs" / "nginx-access.log"
        # A second `up` on the same folder keeps the store and the log of the first.
        logged_before = requests_in(access_log)
        stored_before = httpx.get(f"{replicas[0].url}/feedback/stats").json()["predictions"]
        with httpx.Client(base_url="http://127.0.0.1:8080", timeout=30) as client:
            replies = [
                client.post("/predict", files={"image": ("d.png", png, "image/png")})
                for png in digits * 2
            ]
            assert [r.status_code for r in replies] == [200] * len(replies)
            assert all(r.json().get("logged", True) for r in replies)
            answered = {r.headers["X-Upstream"] for r in replies}
            assert answered == {f"127.0.0.1:{r.port}" for r in replicas}
            # One store behind both: each replica counts the predictions the other logged too,
            # once the other's journal has committed them (within milliseconds).
            deadline = time.monotonic() + 5
            while True:
                counts = [
                    httpx.get(f"{r.url}/feedback/stats").json()["predictions"] for r in replicas
                ]
                if counts == [stored_before + len(replies)] * 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert counts == [stored_before + len(replies)] * 2
            # The Monitor reads the one store too: every replica shows the same figures.
            reports = [httpx.get(f"{r.url}/monitor", timeout=30).json() for r in replicas]
            for report in reports:
                del report["generated_at"]
            assert reports[0] == reports[1]
            served = next(v for v in reports[0]["versions"] if v["serving"])
            assert served["predictions"] >= len(replies) and served["buckets"]

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
        stopped = sh(down)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert sh(status).returncode == 3  # nothing runs
    assert not [t for t in trees if alive(t)]
    assert all(p.handle() is None for p in records)
    assert not [p.port for p in records if port_in_use(p.port)]
    assert sh(down).returncode == 0  # a second `down` is harmless
    # One access log, at the edge: nginx's has every request; the replicas write none.
    logged = requests_in(access_log) - logged_before
    assert logged == 3 * len(digits)
    for replica in replicas:
        assert "path=/predict" not in (DIRECTORY / "logs" / f"{replica.name}.log").read_text()
