"""Predictions, off the event loop: preprocess -> forward pass -> log -> reply.

One thread per worker does the prediction routes' work in rounds: everything queued while it
was busy is prepared, answered by one forward pass per model, and logged in one append to the
prediction journal; the replies go back to the event loop together. A request alone in its
worker is done on the event loop, in a round of its own.

A reply says `logged: false` exactly when its row did not reach the journal: no acknowledged
write is ever lost silently, and a broken store never fails a prediction.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import queue
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from digitops import monitoring
from digitops.files import png
from digitops.inference.errors import RequestError
from digitops.inference.journal import PredictionJournal
from digitops.inference.metrics import ServiceMetrics
from digitops.inference.preprocess import DEFAULT_MAX_BYTES, Options, Preprocessed, prepare
from digitops.inference.served import ServedModel
from digitops.inference.store import StoreError

log = logging.getLogger("bentoml.digitops")


@dataclass
class Job:
    """One request's images, options and the model it started with (and finishes on)."""

    images: list[bytes]
    options: Options
    model: ServedModel
    log: bool = True  # False: a preview, not stored for feedback
    # A lone image's error is its request's (/predict); in a batch each image answers for
    # itself, and one bad image does not fail its neighbours.
    alone: bool = True
    done: asyncio.Future | None = field(default=None, repr=False)


class PredictionThread:
    """Runs jobs for the event loop, one round at a time (see the module's docstring)."""

    def __init__(
        self,
        journal: PredictionJournal | None,
        metrics: ServiceMetrics,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_round: int = 64,
    ):
        self.journal, self.metrics = journal, metrics
        self.max_bytes, self.max_round = max_bytes, max_round
        self._queue: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._running = 0  # calls of run() not yet answered (all on one event loop)
        self._working = False  # whether the thread is in a round
        threading.Thread(target=self._serve, name="predictions", daemon=True).start()

    async def run(self, job: Job) -> list[dict]:
        """The replies of `job` (error replies for a batch's bad images), once logged; or the
        error of a lone image, raised. A request alone in this worker is done on the event
        loop (no thread hand-offs); under load jobs go to the thread's rounds."""
        self._running += 1
        try:
            if self._alone():
                await asyncio.sleep(0)  # requests that arrived meanwhile count themselves first
                if self._alone():
                    (outcome,) = self.round([job])
                    if isinstance(outcome, Exception):
                        raise outcome
                    return outcome
            job.done = asyncio.get_running_loop().create_future()
            self._queue.put(job)
            return await job.done
        finally:
            self._running -= 1

    def _alone(self) -> bool:
        return self._running == 1 and not self._working and self._queue.empty()

    def _serve(self) -> None:
        while True:
            jobs = [self._queue.get()]
            self._working = True
            while len(jobs) < self.max_round:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                outcomes = self.round(jobs)
            except Exception as err:  # a bug must still answer every request, not end the thread
                log.exception("prediction round failed")
                outcomes = [err] * len(jobs)
            for job, outcome in zip(jobs, outcomes, strict=True):
                job.done.get_loop().call_soon_threadsafe(_settle, job.done, outcome)
            self._working = False

    def round(self, jobs: list[Job]) -> list[list[dict] | Exception]:
        """Each job's replies, or the error that fails it."""
        prepared = [[self._prepare(data, job) for data in job.images] for job in jobs]
        outcomes, logged = [], []
        for job, inputs, answers in zip(jobs, prepared, _forward(jobs, prepared), strict=True):
            if isinstance(answers, Exception):
                outcomes.append(answers)
            elif job.alone and isinstance(inputs[0], RequestError):
                outcomes.append(inputs[0])
            else:
                outcomes.append(self._answer(job, inputs, zip(*answers, strict=True), logged))
        if logged and self.journal is not None:
            error = self.journal.append([row for _, row in logged])
            for reply, _ in logged if error is not None else ():
                self._unlogged(reply, error)
        return outcomes

    def _answer(self, job: Job, inputs: list, answers, logged: list) -> list[dict]:
        """A job's replies; the (reply, row) of each one to log is added to `logged`."""
        replies = []
        for data, item in zip(job.images, inputs, strict=True):
            if isinstance(item, RequestError):
                replies.append({"error": str(item), "status": item.status})
                continue
            probabilities, digit_score, embedding = next(answers)
            p, input_png, prediction_id = (
                probabilities.tolist(),
                png(item.pixels),
                new_prediction_id(),
            )
            reply = prediction_payload(
                p, float(digit_score), input_png, item.inverted, job.model, prediction_id
            )
            self.metrics.prediction(
                reply["digit"], reply["confidence"], item.inverted, reply["is_digit"]
            )
            replies.append(reply)
            if not job.log:
                reply["logged"] = False
            elif self.journal is None:
                self._unlogged(reply, "no prediction store")
            else:
                row = self.journal.store.record(
                    prediction_id,
                    input_png,
                    p,
                    item.inverted,
                    reply["model"]["version"],
                    data,
                    job.options.noise,
                    reply["digit_score"],
                    reply["is_digit"],
                    embedding,
                    monitoring.input_stats(item.pixels[None])[0],
                )
                logged.append((reply, row))
        return replies

    def _prepare(self, data: bytes, job: Job) -> Preprocessed | RequestError:
        try:
            return prepare(data, job.options, self.max_bytes)
        except RequestError as err:  # the request's own error (400, 413, 415...)
            return err

    def _unlogged(self, reply: dict, error: StoreError | str) -> None:
        reply["logged"] = False
        self.metrics.store_failures.inc()
        log.warning("prediction not logged: %s", error)


def _forward(jobs: list[Job], prepared: list[list]) -> list[tuple | Exception]:
    """(probabilities, digit scores, embeddings) of each job's usable images, one forward pass
    per model; a failed pass is the error of every job it was for."""
    results: list = [(np.empty((0, 10), np.float32), np.empty(0, np.float32), [])] * len(jobs)
    by_model: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        by_model.setdefault(id(job.model), []).append(i)
    for members in by_model.values():
        pixels = [[p.pixels for p in prepared[i] if isinstance(p, Preprocessed)] for i in members]
        batch = [image for images in pixels for image in images]
        if not batch:
            continue
        try:
            probabilities, scores, embeddings = jobs[members[0]].model.answers(np.stack(batch))
            if embeddings is None:  # a model without a Monitor reference
                embeddings = [None] * len(batch)
        except Exception as err:
            log.exception("forward pass failed")
            for i in members:
                results[i] = err
            continue
        start = 0
        for i, images in zip(members, pixels, strict=True):  # each job's rows, in order
            rows = slice(start, start + len(images))
            results[i] = (probabilities[rows], scores[rows], embeddings[rows])
            start = rows.stop
    return results


def _settle(done: asyncio.Future, outcome: list[dict] | Exception) -> None:
    if done.cancelled():  # the client went away; its rows are logged all the same
        return
    if isinstance(outcome, Exception):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)


def new_prediction_id() -> str:
    """32 hex digits: the time in milliseconds, then 80 random bits (time-ordered, as a
    UUIDv7, so that ids sort by age)."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def prediction_payload(
    probabilities: Sequence[float],
    digit_score: float,
    input_png: bytes,
    inverted: bool,
    model: ServedModel,
    prediction_id: str | None,
) -> dict:
    """The JSON of a prediction; without `prediction_id` when it is not logged for feedback."""
    p = probabilities
    digit = max(range(len(p)), key=p.__getitem__)
    payload = {
        "digit": digit,
        "confidence": round(p[digit], 6),
        "probabilities": [round(x, 6) for x in p],
        "is_digit": digit_score >= model.threshold,
        "digit_score": round(digit_score, 4),
        "inverted": bool(inverted),
        "input_png": b64(input_png),
        "prediction_id": prediction_id,
        "model": model.identity(),
    }
    if prediction_id is None:
        del payload["prediction_id"]
    return payload
