"""How the worker processes of one server agree on the model after `/admin/reload`.

The worker that reloads writes a notice file; the others poll it and load the same BentoML
store entry. Workers of one server share a parent process, which names the file, so two
servers on one host never hear each other.
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

from digitops.files import write_bytes_atomic

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
