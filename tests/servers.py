"""Real server processes for the e2e tests and the benchmarks, on free loopback ports."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

from deploy.ports import free_port
from deploy.postgres import LocalPostgres
from digitops.inference.settings import KEEP_ALIVE_SECONDS

ROOT = Path(__file__).resolve().parents[1]
# The process group behind each running server's base URL, for tests that kill it.
PROCESSES: dict[str, subprocess.Popen] = {}


@contextlib.contextmanager
def running(
    cmd: list[str],
    port: int,
    log: Path,
    ready_path: str = "/readyz",
    env: dict[str, str | None] | None = None,
    timeout: float = 120,
    cwd: Path = ROOT,
) -> Iterator[str]:
    """Start `cmd` in its own process group, wait for `ready_path` to answer 200, yield the base
    URL; stop the whole group afterwards. A None in `env` unsets that variable."""
    merged = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **(env or {}),
    }
    env = {k: v for k, v in merged.items() if v is not None}
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(base + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} not ready in {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        PROCESSES[base] = proc
        yield base
    finally:
        PROCESSES.pop(base, None)
        stop(proc)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a server and every process it started, as a power cut would (its workers run
    in sessions of their own, so killing its process group would leave them serving)."""
    processes = [psutil.Process(proc.pid)]
    with contextlib.suppress(psutil.Error):
        processes += processes[0].children(recursive=True)
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(processes, timeout=30)
    proc.wait(timeout=30)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the process group of `proc` (a server and its workers) and wait for it."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
    except ProcessLookupError:
        return  # already gone
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def serve_command(service: str, port: int) -> list[str]:
    """`bentoml serve` on loopback, as `make serve` runs it."""
    return [
        *("bentoml", "serve", service, "--host", "127.0.0.1", "--port", str(port)),
        *("--timeout-keep-alive", str(KEEP_ALIVE_SECONDS)),
    ]


@contextlib.contextmanager
def bentoml_serve(
    workdir: Path, service: str = "serving.service:DigitService", **env: str
) -> Iterator[tuple[str, Path]]:
    """`bentoml serve` with its BentoML home and prediction store in `workdir`."""
    port = free_port()
    log = workdir / "serve.log"
    settings = {
        "BENTOML_HOME": str(workdir / "bentoml_home"),
        "DIGITOPS_PREDICTIONS_DB": str(workdir / "predictions.db"),
        **env,
    }
    with running(serve_command(service, port), port, log, env=settings) as base:
        yield base, log


@contextlib.contextmanager
def mlflow_server(workdir: Path, port: int | None = None) -> Iterator[str]:
    """`mlflow server` with its database (SQLite) and artifacts in `workdir`; clients upload and
    download artifacts through it. Yields the tracking URI. Start it again with the same
    `workdir` and `port` and it is the same server."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        str(workdir / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",  # the default, 4, would spend the cores the servers under test need
    ]
    with running(cmd, port, workdir / "mlflow.log", ready_path="/health") as base:
        yield base


def store_model(
    bentoml_home: Path, checkpoint: bytes, labels: dict[str, str] | None = None
) -> None:
    """Put a `digit-cnn` entry holding `checkpoint` into a BentoML home, as the `bento` stage
    does (in a subprocess: BentoML reads BENTOML_HOME once per process)."""
    code = (
        "import bentoml, json, sys\n"
        "with bentoml.models.create('digit-cnn', labels=json.loads(sys.argv[1])) as m:\n"
        "    open(m.path_of('model.pt'), 'wb').write(sys.stdin.buffer.read())"
    )
    subprocess.run(
        [sys.executable, "-c", code, json.dumps(labels or {})],
        input=checkpoint,
        env={**os.environ, "BENTOML_HOME": str(bentoml_home)},
        check=True,
        timeout=120,
    )


@contextlib.contextmanager
def postgres_server() -> Iterator[LocalPostgres]:
    """A throwaway PostgreSQL server (no fsync) on a free loopback port, removed afterwards."""
    # Not pytest's tmp_path: its folders are private to root, and the server runs as `postgres`.
    folder = Path(tempfile.mkdtemp(prefix="digitops-pg-"))
    folder.chmod(0o755)
    try:
        with LocalPostgres(folder / "pg").start(fsync=False) as server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)
