"""How the workers of a server learn that the model changed.

Following the MLflow registry (DIGITOPS_REGISTRY_POLL_SECONDS), every worker of every replica
looks up the alias on its own, so moving the alias is the whole rollout. Otherwise
`/admin/reload` changes the model: the worker that reloads writes a notice file (named by the
workers' parent process) and the others follow it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from digitops.files import write_bytes_atomic
from digitops.inference.served import (
    ModelUnavailable,
    ServedModel,
    load_registry_version,
    load_served_model,
)

if TYPE_CHECKING:
    from digitops.inference.settings import Settings
    from digitops.tracking import ModelVersion, Tracking

log = logging.getLogger("bentoml.digitops")

POLL_SECONDS = 1.0


def keep_following(
    look: Callable[[], None], interval: float, what: str, failing: bool = False
) -> None:
    """Call `look()` every `interval` seconds in a daemon thread. A failure keeps the current
    model and is logged once per run of failures (`failing`: one is under way); it goes on."""

    def poll() -> None:
        nonlocal failing
        while True:
            time.sleep(interval)
            try:
                look()
            except Exception as err:
                if not failing:
                    log.warning("cannot follow %s (%s); serving the current model", what, err)
                failing = True
                continue
            if failing:
                log.info("following %s again", what)
            failing = False

    threading.Thread(target=poll, name="follower", daemon=True).start()


class ReloadNotices:
    def __init__(self, path: Path | None = None):
        self.path = path or Path(tempfile.gettempdir()) / f"digitops-reload-{os.getppid()}.json"
        # Notices older than this worker are from an earlier server with the same parent.
        self._seen_ns = time.time_ns()

    def announce(self, store_tag: str | None) -> None:
        """Tell the other workers to serve `store_tag` (atomic: never half a notice)."""
        notice = json.dumps({"tag": store_tag, "pid": os.getpid()}).encode()
        write_bytes_atomic(self.path, notice, fsync=False)

    def follow(self, current_tag: Callable[[], str | None], switch: Callable[[str], None]) -> None:
        """Call `switch(tag)` for every newer notice naming another tag."""

        def look() -> None:
            changed = self.path.stat().st_mtime_ns if self.path.exists() else 0
            if changed > self._seen_ns:
                self._seen_ns = changed
                tag = json.loads(self.path.read_text())["tag"]
                if tag != current_tag():
                    switch(tag)

        keep_following(look, POLL_SECONDS, f"the reloads announced in {self.path}")


class RegistryFollower:
    """Keeps a worker on the registry version that holds an alias: a look-up per interval, a
    download when it changed. A registry down or an alias gone: the worker keeps its model."""

    def __init__(self, tracking: Tracking, alias: str, interval: float):
        self.tracking = tracking
        self.alias = alias
        self.interval = interval
        self.name = f"{tracking.model_name}@{alias} in {tracking.tracking_uri}"
        # A poll and /admin/reload never download at once, and the later look-up is served last.
        self._lock = threading.Lock()
        self._failed_at_start = False

    def load(self) -> ServedModel:
        """The version holding the alias now; ModelUnavailable or TrackingError if none."""
        with self._lock:
            return load_registry_version(self.tracking, self.alias, self._holder())

    def first(self, fallback: Callable[[], ServedModel]) -> ServedModel:
        """What a worker starts with: the alias's version, else `fallback()` until a poll finds
        it (the registry is down, or nothing holds the alias yet)."""
        try:
            return self.load()
        except Exception as err:  # whatever the registry does, the replica must serve
            served = fallback()
            log.warning("cannot follow %s (%s); serving %s", self.name, err, served.source)
            self._failed_at_start = True
            return served

    def follow(
        self, current: Callable[[], ServedModel], switch: Callable[[ServedModel], None]
    ) -> None:
        """Call `switch(model)` whenever another version holds the alias."""

        def look() -> None:
            with self._lock:
                holder = self._holder()
                if holder.version != current().registry_version:
                    switch(load_registry_version(self.tracking, self.alias, holder))

        keep_following(look, self.interval, self.name, failing=self._failed_at_start)

    def _holder(self) -> ModelVersion:
        holder = self.tracking.holder(self.alias)
        if holder is None:
            raise ModelUnavailable(f"no version holds the alias {self.alias!r}")
        return holder


def registry_follower(settings: Settings) -> RegistryFollower | None:
    """A worker's follower of the registry alias, when DIGITOPS_REGISTRY_POLL_SECONDS is set."""
    if not settings.registry_poll_seconds:
        return None
    # Here, not at the top: mlflow takes seconds to import and only a follower needs it.
    from digitops.tracking import Tracking

    tracking = Tracking.for_polling(settings.registered_model)
    return RegistryFollower(tracking, settings.registry_alias, settings.registry_poll_seconds)


def starting_model(settings: Settings, registry: RegistryFollower | None) -> ServedModel:
    """The alias's version when following the registry; else (or meanwhile) the newest BentoML
    store entry or the shipped model."""

    def unfollowed() -> ServedModel:
        return load_served_model(settings.model_tag, settings.shipped_model)

    return unfollowed() if registry is None else registry.first(unfollowed)


def newest_model(settings: Settings, registry: RegistryFollower | None) -> ServedModel:
    """What /admin/reload switches to; no fallback to the shipped model."""
    if registry is not None:
        return registry.load()
    return load_served_model(settings.model_tag, settings.shipped_model, fallback=False)
