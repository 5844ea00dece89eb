"""The thread that does the prediction routes' work, off the event loop.

A request crosses threads once each way: its job is queued here, and its reply is handed
back to the event loop; a lone drawing, which finds the thread idle, is done on the loop and
crosses no thread. Everything that queued while the thread was busy is done in one round,
step by step: every job's images prepared, one forward pass per model for all of them, every
job's replies, their rows of the prediction log in one append to its journal (which a thread
of its own commits to the store in groups: journal.py), and the replies back to the loop in
one wake-up. A lone request waits for nothing but its own work and its row's append.

Why steps, not jobs one after the other: a step repeated for several images runs with its code
and data still in the CPU's caches, and one forward pass serves them all. A request's work done
in a round of 16 cost 1.10 ms against 1.38 ms job by job (README.md, "Serving"). (With a
thread pool per step - work, then a log writer - each request crossed threads four times, and
under load the hand-offs cost more CPU than the work.)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np

from digitops.inference.journal import PredictionLog
from digitops.inference.store import StoreError

log = logging.getLogger("bentoml.digitops")

# A reply's JSON and the row that logs it (None: the caller asked for no logging).
Reply = tuple[dict, dict | None]


class Model(Protocol):
    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities [N, 10] for uint8 pixels [N, 28, 28]."""


class Job(Protocol):
    """One request's work, in two steps around the forward pass that it shares with the
    other requests of its round."""

    model: Model  # the model the request started with

    def prepare(self) -> np.ndarray:
        """The model's inputs [N, 28, 28] (N may be 0); raises the request's error."""

    def answer(self, probabilities: np.ndarray) -> list[Reply]:
        """The replies, given the probabilities [N, 10] of what `prepare` gave."""


class PredictionThread:
    """Runs jobs for the event loop and logs what they predicted before answering.

    A reply says `logged: false` exactly when its row did not reach the prediction log (its
    journal cannot be written, or the store is too far behind), so no acknowledged write is
    ever lost silently; a broken log never fails a prediction. `on_unlogged` hears each such
    row's error.
    """

    def __init__(
        self,
        log: PredictionLog | None,
        on_unlogged: Callable[[StoreError], None],
        max_round: int = 64,
    ):
        self.log = log
        self.on_unlogged = on_unlogged
        self.max_round = max_round
        self._queue: queue.SimpleQueue[tuple[Job, asyncio.Future]] = queue.SimpleQueue()
        self._working = False  # whether the thread is in a round
        self._running = 0  # calls of run() not yet answered (all on one event loop)
        threading.Thread(target=self._serve, name="predictions", daemon=True).start()

    async def run(self, job: Job, light: bool = False) -> list[dict]:
        """The replies of `job`, once their rows are journaled; or what it raised.

        A `light` job (a millisecond or two of work, as a drawing's) that finds the thread idle
        is done right here, on the event loop: a lone request then skips the two hand-offs,
        0.1-0.5 ms of its 1.9-3 ms (README.md, "Serving"). Every other job goes to the
        thread's next round, so a big photo never holds up the loop."""
        self._running += 1
        try:
            if light and self._idle():
                # Requests that arrived meanwhile start first, and count themselves: under load
                # the thread's rounds take them all, and the loop goes on parsing requests.
                await asyncio.sleep(0)
                if self._running == 1 and self._idle():
                    return _replies(self._round([job])[0])
            done = asyncio.get_running_loop().create_future()
            self._queue.put((job, done))
            return await done
        finally:
            self._running -= 1

    def _idle(self) -> bool:
        return not self._working and self._queue.empty()

    def _serve(self) -> None:
        while True:
            jobs = [self._queue.get()]
            self._working = True
            while len(jobs) < self.max_round:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            outcomes = self._round([job for job, _ in jobs])
            _deliver([(done, outcome) for (_, done), outcome in zip(jobs, outcomes, strict=True)])
            self._working = False

    def _round(self, jobs: list[Job]) -> list[list[Reply] | BaseException]:
        """Each job's replies, their rows journaled; or the error it raised."""
        try:
            outcomes = _work(jobs)
            self._log([r for outcome in outcomes if isinstance(outcome, list) for r in outcome])
        except Exception as err:  # a bug must still answer every request, not end the thread
            log.exception("prediction round failed")
            outcomes = [err] * len(jobs)
        return outcomes

    def _log(self, replies: list[Reply]) -> None:
        """Journal the rows of `replies` in one write; if that fails, mark every reply that had
        a row."""
        logged = [(payload, row) for payload, row in replies if row is not None]
        if not logged or self.log is None:  # without a log (no store) there are no rows
            return
        try:
            error = self.log.append([row for _, row in logged])
        except Exception as err:  # a bug here must still answer every waiting request
            error = StoreError(f"prediction log failed: {err}")
        if error is None:
            return
        for payload, _ in logged:
            payload["logged"] = False
            self.on_unlogged(error)


def _work(jobs: list[Job]) -> list[list[Reply] | BaseException]:
    """Each job's replies, or the error it raised: every job prepared, one forward pass per
    model, every job answered."""
    inputs = [_attempt(job.prepare) for job in jobs]
    probabilities = _forward(jobs, inputs)
    return [
        found if isinstance(found, BaseException) else _attempt(job.answer, found)
        for job, found in zip(jobs, probabilities, strict=True)
    ]


def _forward(jobs: list[Job], inputs: list) -> list[np.ndarray | BaseException]:
    """The probabilities for each job's inputs: one forward pass per model for all of them.
    A job whose inputs are an error keeps it; a failed pass is the error of all its jobs."""
    results: list = list(inputs)
    by_model: dict[int, list[int]] = {}
    for i, (job, pixels) in enumerate(zip(jobs, inputs, strict=True)):
        if not isinstance(pixels, BaseException):
            by_model.setdefault(id(job.model), []).append(i)
    for members in by_model.values():
        batch = [inputs[i] for i in members]
        try:
            pixels = batch[0] if len(batch) == 1 else np.concatenate(batch)
            if len(pixels) == 0:  # every image of these jobs failed: nothing to predict
                probabilities = np.empty((0, 10), dtype=np.float32)
            else:
                probabilities = jobs[members[0]].model.probabilities(pixels)
        except Exception as err:
            for i in members:
                results[i] = err
            continue
        start = 0
        for i in members:  # each job's rows, in the order they went in
            end = start + len(inputs[i])
            results[i], start = probabilities[start:end], end
    return results


def _attempt(step: Callable, *args) -> object:
    try:
        return step(*args)
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
            done.set_result(_replies(outcome))


def _replies(outcome: list[Reply] | BaseException) -> list[dict]:
    """A job's reply payloads, or the error it raised, raised."""
    if isinstance(outcome, BaseException):
        raise outcome
    return [payload for payload, _ in outcome]
