"""A thread that does some held-back work every so often: what the request path leaves for later
(access lines, metric updates) is done here, off the event loop, in batches."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Periodic:
    """Calls `work` every `seconds` in a daemon thread named `name`; `stop` ends the thread and
    calls `work` once more, so nothing held is left behind."""

    def __init__(self, work: Callable[[], None], seconds: float, name: str):
        self.work = work
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(seconds,), name=name, daemon=True)
        self._thread.start()

    def _run(self, seconds: float) -> None:
        while not self._stopped.wait(seconds):
            self.work()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self.work()
