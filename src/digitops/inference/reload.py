"""How the workers of a server learn that the model changed.

Following the MLflow registry (DIGITOPS_REGISTRY_POLL_SECONDS), every worker of every replica
looks up the alias on its own, so moving the alias is the whole rollout.

Otherwise only `/admin/reload` changes the model: the worker that reloads writes a notice file;
the others poll it and load the same BentoML store entry. Workers of one server share a parent
process, which names the file, so two servers on one host never hear each other.
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


class ReloadNotices:
    def __init__(self, path: Path | None = None):
        self.path = path or Path(tempfile.gettempdir()) / f"digitops-reload-{os.getppid()}.json"
        # Notices older than this worker are from an earlier server with the same parent.
        self._started_ns = time.time_ns()

    def announce(self, store_tag: str | None) -> None:
        """Tell the other workers to serve `store_tag` (atomic: never half a notice)."""
        notice = json.dumps({"tag": store_tag, "pid": os.getpid()}).encode()
        write_bytes_atomic(self.path, notice, fsync=False)

    def follow(self, current_tag: Callable[[], str | None], switch: Callable[[str], None]) -> None:
        """Call `switch(tag)` for every newer notice naming another tag, in a daemon thread."""
        threading.Thread(
            target=self._poll, args=(current_tag, switch), name="reload", daemon=True
        ).start()

    def _poll(self, current_tag: Callable[[], str | None], switch: Callable[[str], None]) -> None:
        seen = self._started_ns
        while True:
            time.sleep(POLL_SECONDS)
            try:
                changed = self.path.stat().st_mtime_ns
                if changed <= seen:
                    continue
                seen = changed
                tag = json.loads(self.path.read_text())["tag"]
                if tag != current_tag():
                    switch(tag)
            except FileNotFoundError:
                continue
            except Exception as err:  # keep serving the current model, and keep following
                log.warning("could not follow a reload: %s", err)


class RegistryFollower:
    """Keeps a worker on the registry version that holds an alias.

    A look-up per interval; a download only when the version changed. A registry that is down
    or an alias that is gone never stops serving: the worker keeps its model and keeps looking.
    """

    def __init__(self, tracking: Tracking, alias: str, interval: float):
        self.tracking = tracking
        self.alias = alias
        self.interval = interval
        self.name = f"{tracking.model_name}@{alias} in {tracking.tracking_uri}"
        # A poll and /admin/reload never download at once, and the later look-up is served last.
        self._lock = threading.Lock()
        self._failing = False  # warn once per run of failures, not once per poll

    @classmethod
    def from_settings(cls, settings: Settings) -> RegistryFollower:
        # Here, not at the top: mlflow takes seconds to import and only a follower needs it.
        from digitops.tracking import Tracking

        tracking = Tracking.for_polling(settings.registered_model)
        return cls(tracking, settings.registry_alias, settings.registry_poll_seconds)

    def load(self) -> ServedModel:
        """The version holding the alias now (start, /admin/reload).

        Raises ModelUnavailable when none holds it or its checkpoint does not load, and
        TrackingError when the registry cannot be asked.
        """
        with self._lock:
            return load_registry_version(self.tracking, self.alias, self._holder())

    def first(self, fallback: Callable[[], ServedModel]) -> ServedModel:
        """What a worker starts with: the alias's version, else `fallback()` until a poll finds
        it (the registry is down, or nothing holds the alias yet)."""
        try:
            return self.load()
        except Exception as err:  # whatever the registry does, the replica must serve
            served = fallback()
            self._failed(err, served)
            return served

    def follow(
        self, current: Callable[[], ServedModel], switch: Callable[[ServedModel], None]
    ) -> None:
        """Call `switch(model)` whenever another version holds the alias, in a daemon thread."""
        threading.Thread(
            target=self._poll, args=(current, switch), name="registry", daemon=True
        ).start()

    def _poll(
        self, current: Callable[[], ServedModel], switch: Callable[[ServedModel], None]
    ) -> None:
        while True:
            time.sleep(self.interval)
            try:
                with self._lock:
                    holder = self._holder()
                    if holder.version != current().registry_version:
                        switch(load_registry_version(self.tracking, self.alias, holder))
            except Exception as err:  # keep serving the current model, and keep following
                self._failed(err, current())
                continue
            if self._failing:
                log.info("following %s again", self.name)
                self._failing = False

    def _holder(self) -> ModelVersion:
        holder = self.tracking.holder(self.alias)
        if holder is None:
            raise ModelUnavailable(f"no version holds the alias {self.alias!r}")
        return holder

    def _failed(self, err: Exception, serving: ServedModel) -> None:
        if not self._failing:
            log.warning(
                "cannot follow %s (%s); serving %s until it can be", self.name, err, serving.source
            )
        self._failing = True


def registry_follower(settings: Settings) -> RegistryFollower | None:
    """A worker's follower of the registry alias, when DIGITOPS_REGISTRY_POLL_SECONDS is set."""
    return RegistryFollower.from_settings(settings) if settings.registry_poll_seconds else None


def starting_model(settings: Settings, registry: RegistryFollower | None) -> ServedModel:
    """The alias's version when following the registry; else, or while the registry cannot
    give it, the newest BentoML store entry or the shipped model."""

    def unfollowed() -> ServedModel:
        return load_served_model(settings.model_tag, settings.shipped_model)

    return unfollowed() if registry is None else registry.first(unfollowed)


def newest_model(settings: Settings, registry: RegistryFollower | None) -> ServedModel:
    """What /admin/reload switches to. No fallback: a failed look-up must never swap the
    champion for the shipped model."""
    if registry is not None:
        return registry.load()
    return load_served_model(settings.model_tag, settings.shipped_model, fallback=False)
