"""Slow tier: the real entry points as subprocesses - DDP on 2 CPU processes, `dvc repro`."""

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import httpx
import pytest

from digitops import checkpoint
from digitops.data import mnist
from tests.conftest import run, scratch_repo
from tests.servers import free_port, running

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_ddp_two_cpu_processes_both_train(tmp_path, mnist_dir):
    run(
        [
            sys.executable,
            "-m",
            "pipelines.train",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "+trainer.limit_train_batches=4",
            "+trainer.limit_val_batches=2",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            "data.val_size=200",
            "threads=1",
            f"paths.mnist={mnist_dir}",
            f"paths.feedback={tmp_path / 'feedback'}",
            f"paths.train_dir={tmp_path}",
            f"paths.checkpoint={tmp_path / 'model.pt'}",
            f"paths.history={tmp_path / 'h.csv'}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=ROOT,
    )
    _, metadata = checkpoint.load(tmp_path / "model.pt")
    ranks = metadata["ranks"]
    assert ranks["world_size"] == 2
    # 1000 training digits shard to 500 per rank: 3 full batches of 128 each.
    assert ranks["steps_per_rank"] == [3, 3], "both ranks must have trained"
    # DDP all-reduces gradients, so both replicas must end with the same weights.
    a, b = ranks["param_checksum_per_rank"]
    assert a == pytest.approx(b, rel=1e-9)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, mnist_dir) -> tuple[Path, str]:
    """A scratch repo on the fixture MNIST with the smoke trainer, after one `dvc repro`, and
    what that run printed. Run once per module: each test works on a copy (`project`)."""
    edits = {
        "conf/config.yaml": [
            ("trainer: default", "trainer: smoke"),
            ("val_size: 5000", "val_size: 200"),
        ]
    }
    project = scratch_repo(tmp_path_factory.mktemp("pipeline") / "repo", mnist_dir, edits)
    return project, run(["dvc", "repro"], cwd=project).stdout


@pytest.fixture
def project(reproduced, tmp_path) -> Path:
    """A copy of the reproduced repo (git, DVC cache, BentoML store and all) of its own; DVC's
    paths are relative, so the copy is a repo in the same state."""
    return Path(shutil.copytree(reproduced[0], tmp_path / "repo", symlinks=True))


def test_dvc_repro_runs_stages_then_is_a_no_op(reproduced, project):
    for stage in ("renders", "evalsets", "train", "evaluate", "promote", "bento"):
        assert f"Running stage '{stage}'" in reproduced[1], stage
    metrics = json.loads((project / "artifacts" / "eval" / "metrics.json").read_text())
    assert metrics["test"]["count"] == 300
    second = run(["dvc", "repro"], cwd=project)
    assert "Running stage" not in second.stdout
    assert "didn't change" in second.stdout or "up to date" in second.stdout
    shown = run(["dvc", "metrics", "show", "--json"], cwd=project).stdout
    assert "accuracy" in shown
    run(["dvc", "plots", "show", "-o", "plots"], cwd=project)
    assert (project / "plots" / "index.html").is_file()
    # A registered model came out of the pipeline, with the data version as a tag.
    _, candidate = checkpoint.load(project / "artifacts" / "eval" / "model.pt")
    assert candidate["registered_version"] == "1"
    assert candidate["data_version"].endswith(".dir")
    assert set(candidate["mnist_sha256"]) == set(mnist.FILES)


def test_a_worse_first_candidate_loses_to_the_shipped_model_which_make_serve_keeps(project):
    """With an empty registry the shipped model is the incumbent: a 4-batch smoke model is not
    promoted, the Bento packages the shipped model, and `make serve` in this checkout serves it
    from the checkout's own BentoML store."""
    run(["dvc", "repro"], cwd=project)
    promotion = json.loads((project / "artifacts" / "promote" / "promotion.json").read_text())
    assert not promotion["promoted"], promotion["reason"]
    assert promotion["incumbent"] == "shipped model models/default/model.pt"
    assert promotion["champion"]["test_accuracy"] > promotion["candidate"]["test_accuracy"]
    assert promotion["serving_version"] is None  # nothing in the registry serves
    bento = json.loads((project / "artifacts" / "bento" / "bento.json").read_text())
    _, shipped = checkpoint.load(ROOT / "models" / "default" / "model.pt")
    assert bento["test_accuracy"] == shipped["test_accuracy"]
    assert any((project / "bentoml_home" / "models" / "digit-cnn").iterdir())

    port = free_port()
    venv = Path(sys.executable).parent.parent
    env = {"BENTOML_HOME": None, "BENTOML_PORT": str(port)}  # the Makefile's default home
    serve = ["make", "serve", f"VENV={venv}"]
    with running(serve, port, project / "serve.log", env=env, cwd=project) as base:
        card = httpx.get(f"{base}/model", timeout=30).json()
    assert card["source"] == f"bentoml model store {bento['model']}"
    assert card["test_accuracy"] == shipped["test_accuracy"]


def stale(project: Path) -> set[str]:
    """The stages `dvc status` reports as changed."""
    status = json.loads(run(["dvc", "status", "--json"], cwd=project).stdout or "{}")
    return {name.split(":")[-1] for name in status}


def test_an_edit_reruns_only_the_stages_that_run_the_edited_code(project):
    run(["dvc", "repro"], cwd=project)
    assert stale(project) == set()
    with open(project / "src" / "digitops" / "inference" / "store.py", "a") as f:
        f.write("# a serving-side edit\n")
    # Only the Bento packages the request path; the model is not retrained or re-evaluated.
    assert stale(project) == {"bento"}
    with open(project / "src" / "digitops" / "release" / "promote.py", "a") as f:
        f.write("# a release-side edit\n")
    assert stale(project) == {"promote", "bento"}
    with open(project / "src" / "digitops" / "model.py", "a") as f:
        f.write("# a model edit\n")
    assert stale(project) == {"train", "evaluate", "promote", "bento"}
    # The service's preprocessing makes the training renders and the evaluation sets too.
    with open(project / "src" / "digitops" / "inference" / "preprocess.py", "a") as f:
        f.write("# a preprocessing edit\n")
    assert stale(project) == {"renders", "evalsets", "train", "evaluate", "promote", "bento"}


def test_dvc_remote_push_pull_offline(project):
    run(["dvc", "push"], cwd=project)
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "data")
    run(["dvc", "pull", "data.dvc"], cwd=project)
    assert mnist.load(project / "data" / "mnist", "t10k")[0].shape == (300, 28, 28)


def readme_experiments() -> list[list[str]]:
    """Every `dvc exp run ...` command README.md shows, as argument lists."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"(dvc exp run (?:-S '[^']+'\s*)+)", text)
    assert commands, "README.md shows no `dvc exp run`"
    return [shlex.split(c) for c in dict.fromkeys(c.strip() for c in commands)]


def test_every_dvc_exp_run_in_the_readme_runs(project):
    """Each documented form, exactly as written (the smoke trainer keeps them short), then
    `dvc exp show` lists each experiment with the values it set."""
    experiments = readme_experiments()
    for cmd in experiments:
        out = run(cmd, cwd=project, timeout=900)
        assert "Ran experiment" in out.stdout, out.stdout[-2000:]
    shown = json.loads(run(["dvc", "exp", "show", "--json"], cwd=project).stdout)
    names = [e["name"] for commit in shown for e in commit.get("experiments") or []]
    assert len(names) >= len(experiments), names
    text = json.dumps(shown)
    for cmd in experiments:
        for setting in cmd[4::2]:
            assert setting.split("=", 1)[1] in text, setting
