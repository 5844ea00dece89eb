"""Package the champion for serving: BentoML model store entry + a built Bento."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from digitops import checkpoint
from digitops.tracking import Tracking

log = logging.getLogger(__name__)


def import_champion(cfg) -> tuple[str, dict]:
    """Copy the MLflow champion's checkpoint into the BentoML store - the shipped model while the
    registry has none (the gate measured candidates against it) - and return (tag, metadata)."""
    import bentoml  # here, so BENTOML_HOME can be set before its first import

    tracking = Tracking.from_config(cfg)
    tracking.check()
    with tempfile.TemporaryDirectory() as tmp:
        champion = tracking.aliased(cfg.promotion.alias, Path(tmp))
        if champion is not None:
            path = champion.path
            labels = {"mlflow_version": champion.version, "alias": cfg.promotion.alias}
        else:
            path = Path(cfg.paths.shipped_model)
            labels = {"source": "shipped"}
            log.info("no '%s' in the registry yet: packaging %s", cfg.promotion.alias, path)
        _, metadata = checkpoint.load(path)
        summary = {
            k: metadata.get(k)
            for k in (
                "registered_version",
                "mlflow_run_id",
                "test_accuracy",
                "data_version",
                "trained_at",
            )
        }
        with bentoml.models.create(
            checkpoint.BENTO_MODEL, labels=labels, metadata=summary
        ) as model:
            shutil.copy(path, model.path_of(checkpoint.FILE_NAME))
    log.info("imported %s into the BentoML store as %s", path, model.tag)
    return str(model.tag), summary


def runtime_requirements(root: Path) -> list[str]:
    """The project's runtime dependencies at exactly the versions constraints.txt tests.

    Dev tools (pytest, ruff, playwright) stay out of the Bento.
    """
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    names = [canonicalize_name(Requirement(d).name) for d in project["dependencies"]]
    return [f"{name}=={pins[name]}" if name in pins else name for name in names]


def build(cfg, root: Path) -> dict:
    """The `bento` stage: import the champion, then `bentoml build` the service in `root`."""
    model_tag, summary = import_champion(cfg)
    out = root / Path(cfg.paths.bento).parent
    dist = out / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    # No build isolation: setuptools is already here, so building needs no download.
    wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*wheel, "-w", str(dist), str(root)], check=True)
    (out / "requirements.txt").write_text("\n".join(runtime_requirements(root)) + "\n")
    import bentoml

    bento = bentoml.bentos.build_bentofile(
        str(root / "serving" / "bentofile.yaml"), build_ctx=str(root)
    )
    result = {"bento": str(bento.tag), "model": model_tag, **summary}
    (root / cfg.paths.bento).write_text(json.dumps(result, indent=2) + "\n")
    return result
