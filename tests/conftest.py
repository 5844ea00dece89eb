"""Shared fixtures: small real MNIST (committed under tests/fixtures) and composed configs."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from digitops.data import mnist
from tests.servers import postgres_server

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(autouse=True)
def _tracking_uri_stays_in_its_test(monkeypatch):
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI for subprocesses: a test's
    tracking server must not become the next test's `dvc repro` target."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """The fixture subset, decompressed like the data stage leaves it."""
    directory = tmp_path_factory.mktemp("mnist")
    mnist._from_directory(FIXTURES / "mnist", directory)
    return directory


def canvas_png(pixels: np.ndarray, size: int = 280) -> bytes:
    """A digit as the web page uploads it: a PNG scaled (bicubic) to the canvas's size."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


# A few images of each kind are enough to run the stages.
SMALL_EVALSETS = {"realworld_per_kind": 5, "notdigits_per_category": 3}


@pytest.fixture(scope="session")
def evalsets_dir(tmp_path_factory, mnist_dir) -> Path:
    """The `evalsets` stage's output, made once, small, from the fixture MNIST."""
    from pipelines import evalsets

    out = tmp_path_factory.mktemp("evalsets")
    spec = SimpleNamespace(seed=0, **SMALL_EVALSETS)
    evalsets.write(out, mnist_dir, spec)
    return out


@pytest.fixture(scope="session")
def renders_dir(tmp_path_factory, mnist_dir) -> Path:
    """The `renders` stage's output for the fixture MNIST's 1,200 training digits."""
    from pipelines import renders

    out = tmp_path_factory.mktemp("renders")
    renders.write(out, mnist_dir, seed=0)
    return out


def compose_cfg(root: Path, mnist_dir: Path, *overrides: str):
    """Compose conf/ with every output under `root`, the fixture MNIST, plus overrides.
    Training mixes in no rendered digits unless the overrides give `paths.renders`."""
    paths = {
        "mnist": mnist_dir,
        "feedback": root / "feedback",
        "train_dir": root / "train",
        "checkpoint": root / "train" / "model.pt",
        "history": root / "train" / "history.csv",
        "eval_dir": root / "eval",
        "metrics": root / "eval" / "metrics.json",
        "candidate": root / "eval" / "model.pt",
    }
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                *(f"paths.{k}={v}" for k, v in paths.items()),
                f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
                "data.val_size=200",
                "data.rendered_share=0",
                *overrides,
            ],
        )


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (Debian's `postgresql`, which .ci/run installs),
    on a free loopback port; stopped and removed afterwards."""
    with postgres_server() as server:
        yield server


# The PostgreSQL case starts a server: not for the fast tier (`make test-fast`).
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def store_location(request, tmp_path) -> str:
    """Where a prediction store lives, once per backend: a SQLite file, or a fresh database on
    the session's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "p.db")
    return request.getfixturevalue("postgres").create_database(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
def make_cfg(tmp_path, mnist_dir, evalsets_dir):
    evalsets = f"paths.evalsets={evalsets_dir}"
    return lambda *overrides: compose_cfg(tmp_path, mnist_dir, evalsets, *overrides)


@pytest.fixture(scope="session")
def client(asgi_client):
    return asgi_client


@pytest.fixture(scope="session")
def asgi_client(tmp_path_factory):
    """The service's ASGI app in process (lifespan, batching and all), with its own store.

    One per test session: BentoML binds its batching dispatcher to the first event loop and
    registers Prometheus metrics when the app is built. Settings that need other values are
    tested against real `bentoml serve` processes (tests/test_e2e_serve.py).
    """
    import os

    from starlette.testclient import TestClient

    os.environ["DIGITOPS_PREDICTIONS_DB"] = str(tmp_path_factory.mktemp("store") / "p.db")
    # Every test shares this client's address: the flood limit is tested on a real server.
    os.environ["DIGITOPS_FEEDBACK_PER_MINUTE"] = "100000"
    from serving.service import DigitService

    with TestClient(DigitService.to_asgi()) as c:
        yield c


def log_prediction(store, *args, **kwargs) -> None:
    """Log one prediction (`PredictionStore.record`'s arguments) straight into `store`."""
    store.insert([store.record(*args, **kwargs)])


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command of the project (dvc, python -m pipelines...) and insist it succeeds."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "BENTOML_HOME": str(cwd / "bentoml_home"),  # the project's default, not make test's
    }
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def scratch_repo(dest: Path, mnist_dir: Path, edits: dict[str, list[tuple[str, str]]]) -> Path:
    """A git + DVC copy of this checkout with `mnist_dir` as its MNIST, an empty feedback set,
    and text replacements applied to its files (e.g. a faster trainer); committed."""
    files = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file() and not rel.startswith("tests/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)  # its outputs are not in this copy's cache
    shutil.copytree(mnist_dir, dest / "data" / "mnist")
    (dest / "data" / "feedback").mkdir(parents=True)
    (dest / "data" / "feedback" / "manifest.jsonl").touch()
    small = [(f"{key}: ", f"{key}: {value}  # was: ") for key, value in SMALL_EVALSETS.items()]
    edits = {**edits, "conf/config.yaml": [*edits.get("conf/config.yaml", []), *small]}
    for rel, replacements in edits.items():
        text = (dest / rel).read_text()
        for old, new in replacements:
            assert old in text, f"{rel} has no {old!r}"
            text = text.replace(old, new)
        (dest / rel).write_text(text)
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "add", "-q", "data"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        run(cmd, cwd=dest)
    return dest
