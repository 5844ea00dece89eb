"""The service's settings: read once from the environment, checked, then passed around.

Every variable is listed in README.md ("Settings"); a test keeps that table and this class
in step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from digitops.inference.preprocess import DEFAULT_MAX_BYTES


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's CPU set, say)."""
    return len(os.sched_getaffinity(0))


# How DIGITOPS_* switches may be written.
BOOLEANS = {"true": True, "yes": True, "on": True, "1": True}
BOOLEANS |= {"false": False, "no": False, "off": False, "0": False}


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    # BentoML store tag to serve; None = the newest `digit-cnn` there, else the shipped model.
    model_tag: str | None = None
    # The model a fresh clone serves; relative to the working directory (the repo for
    # `make serve`, the Bento's src/ when packaged).
    shipped_model: Path = Path("models/default/model.pt")
    # Worker processes, one per core by default: one process's threads share one GIL, so one
    # worker uses about one core however many the machine has.
    workers: int = field(default_factory=usable_cores)
    max_upload_bytes: int = DEFAULT_MAX_BYTES  # the decoder's own limit
    # Prediction log + feedback queue: a SQLite file, or a postgresql:// URL for many replicas.
    predictions_db: str = "var/predictions.db"
    # Unlabelled predictions kept; the oldest beyond this are dropped.
    max_predictions: int = 100_000
    # Feedback requests per client per minute, per worker.
    feedback_per_minute: int = 60
    # Enables POST /admin/reload (Authorization: Bearer <token>); None = reload disabled.
    admin_token: str | None = None
    # MLflow UI base URL, linked from the web page's model card.
    mlflow_ui: str | None = None
    # Seconds between looks at the registry alias; None = serve the BentoML store entry and
    # switch only on /admin/reload. Set, every worker of every replica follows the alias, so
    # moving it is the whole rollout. The registry is MLflow's MLFLOW_TRACKING_URI.
    registry_poll_seconds: int | None = None
    registry_alias: str = "champion"
    registered_model: str = "digit-cnn"
    # BentoML's access log, a line per request. Off where a proxy keeps one (the cluster's
    # nginx): writing it costs a worker CPU on every request.
    access_log: bool = True
    # Requests traced as BentoML's `tracing` config says (exporter, sample rate). Off, its
    # OpenTelemetry middleware skips every route: it makes six spans per request even when none
    # is sampled (the default).
    tracing: bool = False

    @staticmethod
    def variable(name: str) -> str:
        """The environment variable behind field `name`."""
        return f"DIGITOPS_{name.upper()}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Settings from DIGITOPS_* variables; unset or empty ones keep their defaults."""
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = environ.get(cls.variable(f.name), "").strip()
            if not raw:
                continue
            if f.type in ("int", "int | None"):
                if not raw.isdigit() or int(raw) < 1:
                    raise SettingsError(
                        f"{cls.variable(f.name)} must be a positive integer, got {raw!r}"
                    )
                values[f.name] = int(raw)
            elif f.type == "bool":
                if raw.lower() not in BOOLEANS:
                    raise SettingsError(
                        f"{cls.variable(f.name)} must be true or false, got {raw!r}"
                    )
                values[f.name] = BOOLEANS[raw.lower()]
            elif f.type == "Path":
                values[f.name] = Path(raw)
            else:
                values[f.name] = raw
        return cls(**values)


# How long an idle kept-alive connection stays open (`bentoml serve --timeout-keep-alive`;
# BentoML takes it only on the command line). It must outlast the idle timeout of whatever
# keeps connections to us: with BentoML's 5 s, equal to httpx's pool expiry, a client's next
# request could meet the server closing that connection and fail with a reset. nginx keeps
# upstream connections 60 s (deploy/nginx.conf), so we keep them longer.
KEEP_ALIVE_SECONDS = 75


def sampled_share() -> float:
    """BentoML's tracing.sample_rate, as configured for this server."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.tracing.sample_rate.get() or 0.0
