"""The one module that talks to MLflow: runs, the model registry and its aliases.

Also the provenance every run records (git commit, data version) and the config flattened
into run parameters. Everything else calls `Tracking`; nothing else imports mlflow.
"""

from __future__ import annotations

import logging
import os
import subprocess
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml
from mlflow.models import infer_signature

from digitops import checkpoint
from digitops.model import DigitCNN, normalize

log = logging.getLogger(__name__)

# Where a run keeps the checkpoint that serving rebuilds the model from (not the pt2 graph).
CHECKPOINT_ARTIFACT = f"checkpoint/{checkpoint.FILE_NAME}"
EXPERIMENT_KIND = "mlflow.experimentKind"
# How the registry says that no version holds an alias: no such model, no such alias.
NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class ModelVersion:
    """A version of the registered model and the run that logged its checkpoint."""

    version: str
    run_id: str


@dataclass(frozen=True)
class RegisteredModel(ModelVersion):
    """A version of the registered model, with its checkpoint downloaded to `path`."""

    path: Path


class Tracking:
    """One tracking server (or embedded store) and the registered model this project writes."""

    def __init__(self, tracking_uri: str, model_name: str):
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.client = mlflow.MlflowClient(tracking_uri)

    @classmethod
    def from_config(cls, cfg) -> Tracking:
        return cls(cfg.mlflow.tracking_uri, cfg.mlflow.registered_model)

    @classmethod
    def for_polling(cls, model_name: str) -> Tracking:
        """The tracking server MLflow's own MLFLOW_TRACKING_URI names, for a process that asks
        the registry again and again (a server following an alias).

        Each call tries once and gives up within seconds: MLflow by default retries an
        unreachable server for minutes, and here the next poll is the retry. Changes this
        process's MLflow settings unless they are set.
        """
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        return cls(mlflow.get_tracking_uri(), model_name)

    def check(self, timeout: float = 5.0) -> None:
        """Fail at once when a tracking server is down, before a stage changes anything
        (MLflow's client would retry each call for minutes first)."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return  # an embedded store: a file, nothing to reach
        try:
            urllib.request.urlopen(f"{self.tracking_uri.rstrip('/')}/health", timeout=timeout)
        except OSError as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"MLflow tracking server {self.tracking_uri} is unreachable ({reason})"
            ) from None

    # Runs.
    def describe_run(self, run_id: str, name: str, config_yaml: str, tags: dict[str, str]) -> None:
        """Name a training run after its recipe, attach the resolved config (as a file) and
        provenance tags, and make its experiment open in MLflow's model-training view."""
        experiment_id = self.client.get_run(run_id).info.experiment_id
        # MLflow 3 opens an experiment without this tag in its GenAI (traces) view.
        self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, "custom_model_development")
        self.client.set_tag(run_id, "mlflow.runName", name)
        self.client.log_text(run_id, config_yaml, "config.yaml")
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def log_datasets(
        self, run_id: str, datasets: dict[str, tuple[Path, np.ndarray, np.ndarray]], version: str
    ) -> None:
        """Record what a run trained on, {name: (folder, images, labels)}, as MLflow dataset
        inputs (the runs table's Dataset column); the digest is the data's DVC version."""
        mlflow.set_tracking_uri(self.tracking_uri)  # log_input has only the fluent API
        with mlflow.start_run(run_id=run_id):
            for name, (folder, images, labels) in datasets.items():
                with warnings.catch_warnings():
                    # MLflow registers two source types for a local path; both read it alike.
                    warnings.filterwarnings("ignore", "The specified dataset source can be")
                    dataset = mlflow.data.from_numpy(
                        images, targets=labels, source=str(folder), name=name, digest=version[:12]
                    )
                mlflow.log_input(dataset, context="training")

    def log_evaluation(self, run_id: str, metrics: dict[str, float], artifacts: Path) -> None:
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, value)
        self.client.log_artifacts(run_id, str(artifacts), artifact_path="eval")

    def log_checkpoint(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path=Path(CHECKPOINT_ARTIFACT).parent)

    # The registry.
    def register(
        self, model: DigitCNN, run_id: str, example: np.ndarray, tags: dict[str, str]
    ) -> str:
        """Log `model` to run `run_id` (pytorch flavour, signature, example) and register it.

        Returns the new version. The model is logged as a torch.export graph (`pt2`): loading
        it runs no pickled code, and it was traced in eval mode.
        """
        x = normalize(torch.from_numpy(example)).numpy()
        with torch.inference_mode():
            signature = infer_signature(x, model(torch.from_numpy(x)).numpy())
        mlflow.set_tracking_uri(self.tracking_uri)  # log_model has only the fluent API
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                registered_model_name=self.model_name,
                signature=signature,
                input_example=x,
                serialization_format="pt2",
                pip_requirements=["torch", "digitops"],
            )
        version = str(info.registered_model_version)
        self.tag_version(version, tags)
        log.info("registered %s version %s from run %s", self.model_name, version, run_id)
        return version

    def tag_version(self, version: str, tags: dict[str, object]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, version, key, str(value))

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.model_name, alias, version)

    def holder(self, alias: str) -> ModelVersion | None:
        """The version holding `alias`: one registry call. None if no version holds it (or
        nothing is registered yet); TrackingError if the registry cannot be asked."""
        try:
            found = self.client.get_model_version_by_alias(self.model_name, alias)
        except mlflow.exceptions.MlflowException as err:
            if err.error_code in NOT_FOUND:
                return None
            raise TrackingError(f"MLflow registry {self.tracking_uri}: {err.message}") from None
        return ModelVersion(str(found.version), found.run_id)

    def download(self, version: ModelVersion, dest: Path) -> RegisteredModel:
        """The checkpoint of `version`, downloaded into `dest`."""
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=version.run_id,
                artifact_path=CHECKPOINT_ARTIFACT,
                dst_path=str(dest),
                tracking_uri=self.tracking_uri,
            )
        except (mlflow.exceptions.MlflowException, OSError) as err:
            reason = getattr(err, "message", err)
            raise TrackingError(
                f"cannot download {self.model_name} version {version.version}'s checkpoint "
                f"from {self.tracking_uri}: {reason}"
            ) from None
        return RegisteredModel(version.version, version.run_id, Path(path))

    def aliased(self, alias: str, dest: Path) -> RegisteredModel | None:
        """The version holding `alias`, its checkpoint downloaded into `dest`; None if no
        version holds it."""
        holder = self.holder(alias)
        return None if holder is None else self.download(holder, dest)

    def load_logged_model(self, version: str) -> torch.nn.Module:
        """The pt2 graph of a registered version, as a callable module on CPU."""
        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow.pytorch.load_model(f"models:/{self.model_name}/{version}", map_location="cpu")


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def data_version(dvc_file: str | Path = "data.dvc") -> str:
    """The md5 DVC records for `data/`: names exactly the data a model was trained on."""
    try:
        outs = yaml.safe_load(Path(dvc_file).read_text())["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "unversioned"


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become strings, as MLflow params are strings anyway."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value) if isinstance(value, list | tuple) else value
    return flat
