"""The service's settings: read once from the environment, checked, then passed around.
Every variable is listed in README.md ("Settings"); a test keeps the two in step."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from digitops.inference.preprocess import DEFAULT_MAX_BYTES


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use; the message names it."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    # BentoML store tag to serve; None = the newest `digit-cnn` there, else the shipped model.
    model_tag: str | None = None
    # The model a fresh clone serves; relative to the working directory (the repo, or the
    # Bento's src/).
    shipped_model: Path = Path("models/default/model.pt")
    # Worker processes, one per core it may use (one process's threads share one GIL).
    workers: PositiveInt = Field(default_factory=lambda: len(os.sched_getaffinity(0)))
    max_upload_bytes: PositiveInt = DEFAULT_MAX_BYTES  # the decoder's own limit
    # Prediction log + feedback queue: a SQLite file, or a postgresql:// URL for many replicas.
    predictions_db: str = "var/predictions.db"
    # Unlabelled predictions kept; the oldest beyond this are dropped.
    max_predictions: PositiveInt = 100_000
    # Feedback requests per client per minute, per worker.
    feedback_per_minute: PositiveInt = 60
    # Enables POST /admin/reload (Authorization: Bearer <token>); None = reload disabled.
    admin_token: str | None = None
    # MLflow UI base URL, linked from the web page's model card.
    mlflow_ui: str | None = None
    # Seconds between looks at the registry alias (MLFLOW_TRACKING_URI's); None = serve the
    # BentoML store entry and switch only on /admin/reload.
    registry_poll_seconds: PositiveInt | None = None
    registry_alias: str = "champion"
    registered_model: str = "digit-cnn"
    # BentoML's access log, a line per request; off where a proxy keeps one (the cluster's).
    access_log: bool = True
    # Requests traced as BentoML's `tracing` config says. Off, its OpenTelemetry middleware
    # skips every route (it makes six spans per request even when none is sampled).
    tracing: bool = False
    # The Monitor: seconds between refreshes of its Prometheus gauges (and warnings in the
    # log); the MMD^2 score past which input drift is reported (with p < 0.01); how far below
    # the training reference the estimated or measured accuracy may fall before a warning.
    monitor_seconds: PositiveFloat = 60.0
    monitor_drift_score: PositiveFloat = 0.015
    monitor_accuracy_drop: PositiveFloat = 0.02

    @staticmethod
    def variable(name: str) -> str:
        """The environment variable behind field `name`."""
        return f"DIGITOPS_{name.upper()}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Settings from DIGITOPS_* variables; unset or empty ones keep their defaults."""
        raw = {name: environ.get(cls.variable(name), "").strip() for name in cls.model_fields}
        values = {name: value for name, value in raw.items() if value}
        try:
            return cls(**values)
        except ValidationError as err:  # one line naming the variable
            problem = err.errors()[0]
            name = problem["loc"][0]
            reason = problem["msg"][0].lower() + problem["msg"][1:]
            raise SettingsError(f"{cls.variable(name)}: {reason}, got {values[name]!r}") from None


# How long an idle kept-alive connection stays open (`bentoml serve --timeout-keep-alive`). It
# must outlast the idle timeout of whatever keeps connections to us, or a client's next request
# can meet the server closing it: BentoML's 5 s equals httpx's; nginx keeps them 60 s.
KEEP_ALIVE_SECONDS = 75


def sampled_share() -> float:
    """BentoML's tracing.sample_rate, as configured for this server."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.tracing.sample_rate.get() or 0.0
