"""Every command README.md shows in a ```bash block is run by a test, exactly as written, on a
fresh copy of the checkout: by this module (RUN_HERE), or by the test COVERED names. The rest
cannot run here, and NOT_RUN says why. A README edit that adds a command fails the first test
below until the command is placed in one of the three."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cluster import port_in_use
from tests.conftest import scratch_repo
from tests.servers import running, serve_command, store_model

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

PREDICT = "curl -s -F image=@tests/fixtures/digit-7.png http://127.0.0.1:3000/predict"
RELOAD = (
    'curl -X POST -H "Authorization: Bearer $DIGITOPS_ADMIN_TOKEN" '
    "http://127.0.0.1:3000/admin/reload"
)
# Run by this module: the cheap ones on a copy of the checkout; the training and DVC ones on a
# scratch git + DVC repo with the fixture MNIST in data/ (slow); the curls against a real server.
CHEAP = ("make help", "cat artifacts/promote/promotion.json")
SCRATCH = (
    "python -m pipelines.train trainer=smoke logger=csv",
    "python -m pipelines.train model.dropout=0.3 trainer.max_epochs=2",
    "python -m pipelines.train +experiment=fast",
    "dvc metrics show",
    "dvc metrics diff",
    "dvc plots show",
    "dvc exp show",
)
RUN_HERE = {*CHEAP, *SCRATCH, PREDICT, RELOAD}

PIPELINE = "tests/test_pipeline.py::test_"
SERVE = PIPELINE + "a_worse_first_candidate_loses_to_the_shipped_model_which_make_serve_keeps"
EXPERIMENTS = PIPELINE + "every_dvc_exp_run_in_the_readme_runs"
CLUSTER = (
    "tests/test_cluster.py::"
    "test_the_readme_cluster_shares_the_work_and_one_store_survives_a_replica_and_stops"
)
COVERED = {
    "make serve": SERVE,  # with VENV= naming this venv: the scratch repo it serves has none
    "dvc repro": PIPELINE + "dvc_repro_runs_stages_then_is_a_no_op",
    "dvc push": PIPELINE + "dvc_remote_push_pull_offline",  # to the default, local remote
    "dvc exp run -S 'conf/model/cnn.yaml:dropout=0.3' "
    "-S 'conf/trainer/default.yaml:max_epochs=5'": EXPERIMENTS,
    "dvc exp run -S 'conf/config.yaml:init_from=champion' "
    "-S 'conf/config.yaml:optimizer.lr=0.0005' "
    "-S 'conf/trainer/default.yaml:max_epochs=1'": EXPERIMENTS,
    "make cluster-up": CLUSTER,
    "python -m deploy.cluster status": CLUSTER,
    "make cluster-down": CLUSTER,
}

APT = "installs system packages as root; .ci/run installs the same ones before the tests"
NEEDS_SETUP = "needs the .venv/ that `make setup` builds, a network install a test cannot repeat"
NO_DOCKER = "this machine has no Docker daemon"
NOT_RUN = {
    "sudo apt-get install chromium postgresql nginx fonts-comic-neue fonts-dkg-handwriting "
    "fonts-sjfonts fonts-klee fonts-bwht fonts-dancingscript fonts-ecolier-court": APT,
    "sudo apt-get install wrk": APT,
    "make test": "it is CI: .ci/run calls it, and it runs this module",
    "make ingest": NEEDS_SETUP + "; tests/test_active_learning.py runs the ingestion it calls",
    "pip install 'dvc[s3]'": "reaches a package index; tests never reach the internet",
    "dvc remote add -d storage s3://my-bucket/digitops": "names a bucket of the reader's own",
    "BENTOML_HOME=bentoml_home bentoml containerize digitops:<version>": NO_DOCKER,
    "docker run -p 3000:3000 -e DIGITOPS_PREDICTIONS_DB=postgresql://... "
    "-e MLFLOW_TRACKING_URI=http://mlflow:5000 -e DIGITOPS_REGISTRY_POLL_SECONDS=10 "
    "digitops:<version> serve --host 0.0.0.0 --timeout-keep-alive 75": NO_DOCKER,
}


def readme_commands() -> list[str]:
    """The commands in README.md's ```bash blocks: `\\` continuations joined, comments cut."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"^ *```bash\n(.*?)^ *```", text, flags=re.M | re.S):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            command = re.sub(r"(^|\s)#.*", "", line).strip()
            if command:
                commands.append(command)
    return commands


def sh(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`command` as the README's reader runs it: in bash, with the venv's bin/ first on PATH."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "BENTOML_HOME": str(cwd / "bentoml_home"), **env}
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A fresh copy of the checkout: what git tracks, and new files it does not ignore."""
    dest = tmp_path_factory.mktemp("checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for rel in filter(None, listed.split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def test_every_command_is_run_by_a_test_or_says_why_not():
    commands = readme_commands()
    placed = RUN_HERE | COVERED.keys() | NOT_RUN.keys()
    missing = [c for c in commands if c not in placed]
    assert not missing, f"place each in RUN_HERE, COVERED or NOT_RUN: {missing}"
    gone = placed - set(commands)
    assert not gone, f"no longer in README.md: {sorted(gone)}"
    for test in set(COVERED.values()):
        path, name = test.split("::")
        assert (ROOT / path).is_file(), test
        assert f"def {name}(" in (ROOT / path).read_text(), test


def test_the_cheap_commands_run_and_make_help_lists_every_target_the_readme_names(checkout):
    out = {command: sh(command, checkout) for command in CHEAP}
    for command, result in out.items():
        assert result.returncode == 0, f"{command}:\n{result.stdout}{result.stderr}"
    json.loads(out["cat artifacts/promote/promotion.json"].stdout)
    listed = re.sub(r"\x1b\[[0-9;]*m", "", out["make help"].stdout)  # without its colours
    targets = {line.split()[0] for line in listed.splitlines() if line.strip()}
    named = set(re.findall(r"(?:`|^)make ([a-z][a-z-]*)", README.read_text(), flags=re.M))
    assert named <= targets, f"`make help` does not list {sorted(named - targets)}"


@pytest.mark.slow
def test_the_training_and_dvc_commands_run_on_a_scratch_repo(tmp_path, mnist_dir):
    # As tests/test_pipeline.py's project: the smoke trainer keeps each run to a few batches,
    # and the fixture's 1,000 training digits cannot spare the default 5,000 for validation.
    edits = {
        "conf/config.yaml": [
            ("trainer: default", "trainer: smoke"),
            ("val_size: 5000", "val_size: 200"),
        ]
    }
    project = scratch_repo(tmp_path / "repo", mnist_dir, edits)
    for command in SCRATCH:
        out = sh(command, project)
        assert out.returncode == 0, f"{command}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}"


@pytest.mark.e2e
def test_the_curl_commands_against_a_server_on_port_3000(checkout, tmp_path):
    """On the README's own port, so that the curl lines run unchanged."""
    if port_in_use(3000):
        pytest.skip("port 3000, which the README's curl commands name, is taken")
    drawing = PREDICT.split("@")[1].split()[0]
    assert (checkout / drawing).is_file(), f"{drawing}, which the README's curl sends, is missing"
    home = tmp_path / "bentoml_home"
    store_model(home, (ROOT / "models" / "default" / "model.pt").read_bytes())  # to reload
    token = "readme-token"
    env = {
        "BENTOML_HOME": str(home),
        "DIGITOPS_PREDICTIONS_DB": str(tmp_path / "predictions.db"),
        "DIGITOPS_ADMIN_TOKEN": token,
    }
    command = serve_command("serving.service:DigitService", 3000)
    with running(command, 3000, tmp_path / "serve.log", env=env, cwd=checkout):
        predicted = sh(PREDICT, checkout)
        reloaded = sh(RELOAD, checkout, DIGITOPS_ADMIN_TOKEN=token)
    assert predicted.returncode == 0, f"{PREDICT}: {predicted.stderr}"
    reply = json.loads(predicted.stdout)
    assert reply["digit"] == 7, reply
    shown = README.read_text().split(PREDICT, 1)[1].split("```json", 1)[1].split("```", 1)[0]
    fields = set(re.findall(r'"(\w+)":', shown))
    assert fields <= set(reply) | set(reply["model"]), fields - set(reply) - set(reply["model"])
    assert "current" in json.loads(reloaded.stdout), reloaded.stdout
