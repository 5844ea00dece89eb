"""Slow tier: the real entry points as subprocesses - DDP on 2 CPU processes, `dvc repro`."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from digitops import checkpoint
from digitops.data import mnist
from tests.conftest import run, scratch_repo

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


@pytest.fixture
def project(tmp_path, mnist_dir) -> Path:
    """A scratch repo on the fixture MNIST with the smoke trainer."""
    edits = {
        "conf/config.yaml": [
            ("trainer: default", "trainer: smoke"),
            ("val_size: 5000", "val_size: 200"),
        ]
    }
    return scratch_repo(tmp_path / "repo", mnist_dir, edits)


def test_dvc_repro_runs_stages_then_is_a_no_op(project):
    first = run(["dvc", "repro"], cwd=project)
    for stage in ("train", "evaluate", "promote", "bento"):
        assert f"Running stage '{stage}'" in first.stdout, stage
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
    # The first candidate becomes champion, and the Bento serves it.
    promotion = json.loads((project / "artifacts" / "promote" / "promotion.json").read_text())
    assert promotion["promoted"] and promotion["reason"] == "no champion yet"
    bento = json.loads((project / "artifacts" / "bento" / "bento.json").read_text())
    assert bento["bento"].startswith("digitops:") and bento["registered_version"] == "1"


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


def test_dvc_remote_push_pull_offline(project):
    run(["dvc", "push"], cwd=project)
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "data")
    run(["dvc", "pull", "data.dvc"], cwd=project)
    assert mnist.load(project / "data" / "mnist", "t10k")[0].shape == (300, 28, 28)


def test_dvc_exp_run_with_parameter_override(project):
    out = run(["dvc", "exp", "run", "-S", "conf/model/cnn.yaml:dropout=0.3"], cwd=project)
    assert "Ran experiment" in out.stdout or "Experiment" in out.stdout
    shown = run(["dvc", "exp", "show", "--json"], cwd=project).stdout
    assert "0.3" in shown
