"""The thread that does the prediction routes' work, off the event loop.

A request crosses threads once each way: its work is queued here, and its reply is handed
back to the event loop. Everything that queued while the thread was busy is done in one round:
the requests' work one after the other, their rows of the prediction log in one transaction
(group commit), and their replies back to the loop in one wake-up. Under load one commit and
one wake-up serve many requests; a lone request waits for nothing but its own work and its own
row. (With a thread pool per step - work, then a log writer - each request crossed threads four
times, and under load the hand-offs cost more CPU than the work: README.md, "Serving".)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

from digitops.inference.store import PredictionStore, StoreError

log = logging.getLogger("bentoml.digitops")

# A reply's JSON and the row that logs it (None: the caller asked for no logging).
Reply = tuple[dict, dict | None]
Work = Callable[[], list[Reply]]


class PredictionThread:
    """Runs `work` for the event loop and logs what it predicted before answering.

    A reply says `logged: false` exactly when its row was not stored (the store is broken, or
    refused that row), so no acknowledged write is ever lost silently; a broken
    store never fails a prediction. `on_unlogged` hears each such row's error.
    """

    def __init__(
        self,
        store: PredictionStore | None,
        on_unlogged: Callable[[StoreError], None],
        max_round: int = 64,
    ):
        self.store = store
        self.on_unlogged = on_unlogged
        self.max_round = max_round
        self._queue: queue.SimpleQueue[tuple[Work, asyncio.Future]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="predictions", daemon=True).start()

    async def run(self, work: Work) -> list[dict]:
        """The replies `work` makes (in this thread), once their rows are logged; or what it
        raised."""
        done = asyncio.get_running_loop().create_future()
        self._queue.put((work, done))
        return await done

    def _serve(self) -> None:
        while True:
            jobs = [self._queue.get()]
            while len(jobs) < self.max_round:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            outcomes: list = [_attempt(work) for work, _ in jobs]
            try:
                self._log([r for outcome in outcomes if isinstance(outcome, list) for r in outcome])
            except Exception as err:  # a bug must still answer every request, not end the thread
                log.exception("prediction round failed")
                outcomes = [err] * len(jobs)
            _deliver([(done, outcome) for (_, done), outcome in zip(jobs, outcomes, strict=True)])

    def _log(self, replies: list[Reply]) -> None:
        """Store the rows of `replies` in one transaction; mark every reply whose row is not
        stored."""
        logged = [(payload, row) for payload, row in replies if row is not None]
        if not logged or self.store is None:  # without a store there are no rows
            return
        try:
            errors = self.store.insert_each([row for _, row in logged])
        except Exception as err:  # a bug here must still answer every waiting request
            errors = [StoreError(f"prediction log failed: {err}")] * len(logged)
        for (payload, _), error in zip(logged, errors, strict=True):
            if error is not None:
                payload["logged"] = False
                self.on_unlogged(error)


def _attempt(work: Work) -> list[Reply] | BaseException:
    try:
        return work()
    except Exception as err:  # the request's own error (400, 422...), raised where it waits
        return err


def _deliver(outcomes: list[tuple[asyncio.Future, list[Reply] | BaseException]]) -> None:
    """Hand every outcome of a round back to its event loop: one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for done, outcome in outcomes:
        by_loop.setdefault(done.get_loop(), []).append((done, outcome))
    for loop, settled in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, settled)
        except RuntimeError:  # that loop has closed: nobody is waiting any more
            log.debug("dropped %d replies for a closed event loop", len(settled))


def _settle(settled: list[tuple[asyncio.Future, list[Reply] | BaseException]]) -> None:
    for done, outcome in settled:
        if done.cancelled():  # the client went away; its row is logged all the same
            continue
        if isinstance(outcome, BaseException):
            done.set_exception(outcome)
        else:
            done.set_result([payload for payload, _ in outcome])
