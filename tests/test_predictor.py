"""The prediction thread: work off the event loop, one forward pass per model for a round's
requests, their rows journaled in one write (and committed in groups behind the replies), and
replies that say truthfully whether their row was logged."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from digitops.inference.errors import RequestError
from digitops.inference.journal import PredictionLog, _encode
from digitops.inference.predictor import PredictionThread
from digitops.inference.store import PredictionStore, StoreError

PROBS = [0.1] * 10


class Echo:
    """A model that answers each image with its top-left pixel, as a probability, so a job can
    tell its own rows; it notes the size of every forward pass."""

    def __init__(self, fails: bool = False):
        self.passes: list[int] = []
        self.fails = fails

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        if self.fails:
            raise RuntimeError("the model broke")
        self.passes.append(len(pixels))
        return np.repeat(pixels[:, :1, 0] / 255, 10, axis=1)


@dataclass
class Job:
    """A request's job: `images` images whose pixels are all `value`, answered by `answer`."""

    answer: Callable[[np.ndarray], list]
    images: int = 1
    value: int = 0
    model: Echo = field(default_factory=Echo)
    before: Callable[[], None] = lambda: None  # runs as the job is prepared

    def prepare(self) -> np.ndarray:
        self.before()
        return np.full((self.images, 28, 28), self.value, dtype=np.uint8)


def reply_for(store: PredictionStore, prediction_id: str, **job) -> Job:
    """A job that predicts `prediction_id` and asks for it to be logged."""
    return Job(
        lambda probabilities: [
            (
                {"prediction_id": prediction_id},
                store.record(prediction_id, b"png", PROBS, False, "1"),
            )
        ],
        **job,
    )


@pytest.fixture
def journal(tmp_path):
    return tmp_path / "journal"


def thread_for(store: PredictionStore, journal, on_unlogged=lambda err: None, **log):
    """A prediction thread whose rows go through a journaled log into `store`."""
    lost = log.pop("on_lost", lambda row, err: pytest.fail(f"{row['id']} lost: {err}"))
    return PredictionThread(PredictionLog(store, journal, lost, **log), on_unlogged)


def stored(thread: PredictionThread) -> int:
    """How many predictions the store holds once the thread's journaled rows are in."""
    assert thread.log.flush(timeout=30)
    return thread.log.store.stats()["predictions"]


def test_requests_that_queue_up_share_one_commit(store_location, journal):
    store = PredictionStore(store_location)
    commits: list[int] = []
    insert = store.insert
    store.insert = lambda rows: (commits.append(len(rows)), insert(rows))[1]
    errors: list[StoreError] = []
    thread = thread_for(store, journal, errors.append)

    async def main():
        return await asyncio.gather(*(thread.run(reply_for(store, f"p{i}")) for i in range(400)))

    replies = asyncio.run(main())
    assert [r[0]["prediction_id"] for r in replies] == [f"p{i}" for i in range(400)]
    assert not any("logged" in r[0] for r in replies) and not errors
    assert stored(thread) == 400 == sum(commits)
    assert len(commits) < 400 and max(commits) > 1, "rows that queued up share a commit"


def test_a_row_the_store_refuses_is_reported_lost_and_its_neighbours_are_stored(
    store_location, journal
):
    store = PredictionStore(store_location)
    lost: list[str] = []
    thread = thread_for(store, journal, on_lost=lambda row, err: lost.append(row["id"]))
    # Hold the thread on a first request, so the next ones queue up into one round.
    release = threading.Event()

    def refused(probabilities: np.ndarray) -> list:  # a row that breaks a constraint
        row = store.record("bad", b"png", PROBS, False, "1")
        return [({"prediction_id": "bad"}, {**row, "input_png": None})]

    async def main():
        first = asyncio.ensure_future(
            thread.run(reply_for(store, "first", before=lambda: release.wait(30)))
        )
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(thread.run(reply_for(store, p))) for p in ("a", "b")]
        rest.insert(1, asyncio.ensure_future(thread.run(Job(refused))))
        release.set()
        return await asyncio.gather(first, *rest)

    replies = [r[0] for r in asyncio.run(main())]
    assert not any("logged" in r for r in replies)  # all four were journaled
    assert stored(thread) == 3 and lost == ["bad"]  # first, a, b; and "bad" said, not dropped


def test_a_failing_request_fails_alone_and_unlogged_work_is_not_stored(store_location, journal):
    store = PredictionStore(store_location)
    thread = thread_for(store, journal)

    def bad():
        raise RequestError("not an image")

    async def main():
        return await asyncio.gather(
            thread.run(reply_for(store, "bad", before=bad)),
            thread.run(reply_for(store, "ok")),
            thread.run(Job(lambda probabilities: [({"logged": False}, None)])),
            return_exceptions=True,
        )

    failed, ok, unlogged = asyncio.run(main())
    assert isinstance(failed, RequestError) and str(failed) == "not an image"
    assert ok == [{"prediction_id": "ok"}] and unlogged == [{"logged": False}]
    assert stored(thread) == 1


def test_while_the_store_is_down_rows_wait_journaled_then_replies_say_unlogged(tmp_path):
    store = PredictionStore(tmp_path / "p.db")
    errors: list[StoreError] = []
    row_bytes = len(_encode(store.record("p0", b"png", PROBS, False, "1")))
    # Room in the backlog for two rows (their sizes differ by a byte or two: the times).
    thread = thread_for(
        store, tmp_path / "journal", errors.append, max_backlog_bytes=row_bytes * 5 // 2
    )
    insert = store.insert
    store.insert = lambda rows: (_ for _ in ()).throw(StoreError("disk full"))

    async def main(names):
        return [(await thread.run(reply_for(store, name)))[0] for name in names]

    replies = asyncio.run(main(["p0", "p1", "p2"]))
    assert replies == [{"prediction_id": "p0"}, {"prediction_id": "p1"},
                       {"prediction_id": "p2", "logged": False}]  # fmt: skip
    assert len(errors) == 1 and "behind" in str(errors[0])
    assert not thread.log.flush(timeout=0.2)  # p0 and p1 wait in the journal
    store.insert = insert  # the store is back: the writer's next try puts them in
    assert stored(thread) == 2


@pytest.mark.parametrize("n", [1, 3])
def test_replies_come_back_to_the_loop_that_asked(store_location, journal, n):
    store = PredictionStore(store_location)
    thread = thread_for(store, journal)
    for run in range(n):  # a new event loop each time, one thread for all of them
        (reply,) = asyncio.run(thread.run(reply_for(store, f"p{run}")))
        assert reply == {"prediction_id": f"p{run}"}


def test_a_failing_round_answers_its_requests_and_the_thread_goes_on(store_location, journal):
    store = PredictionStore(store_location)

    def broken_handler(err: StoreError) -> None:
        raise RuntimeError("a bug in the handler")

    thread = thread_for(store, journal, broken_handler)
    append = thread.log.append
    thread.log.append = lambda rows: StoreError("disk full")
    with pytest.raises(RuntimeError, match="a bug in the handler"):
        asyncio.run(thread.run(reply_for(store, "p")))  # unlogged: the handler runs, and fails
    thread.log.append = append
    (reply,) = asyncio.run(thread.run(reply_for(store, "next")))
    assert reply == {"prediction_id": "next"}


def test_a_round_runs_one_forward_pass_per_model_and_each_job_gets_its_own_rows(
    store_location, journal
):
    thread = thread_for(PredictionStore(store_location), journal)
    release = threading.Event()
    first, second = Echo(), Echo()

    def rows(probabilities: np.ndarray) -> list:
        return [({"seen": [round(p[0] * 255) for p in probabilities]}, None)]

    async def main():
        held = asyncio.ensure_future(
            thread.run(Job(rows, model=first, before=lambda: release.wait(30)))
        )
        await asyncio.sleep(0.05)
        queued = [  # (images, value, model)
            (2, 10, first), (0, 0, first), (1, 20, second), (3, 30, first), (1, 40, second),
        ]  # fmt: skip
        rest = [
            asyncio.ensure_future(thread.run(Job(rows, n, value, model)))
            for n, value, model in queued
        ]
        release.set()
        return await asyncio.gather(held, *rest)

    replies = [r[0]["seen"] for r in asyncio.run(main())]
    assert replies == [[0], [10, 10], [], [20], [30, 30, 30], [40]]
    assert first.passes == [1, 5] and second.passes == [2]  # the held round, then one each


def test_a_failing_forward_pass_fails_only_the_jobs_of_its_model(store_location, journal):
    store = PredictionStore(store_location)
    thread = thread_for(store, journal)
    release = threading.Event()
    broken = Echo(fails=True)

    async def main():
        held = asyncio.ensure_future(
            thread.run(reply_for(store, "held", before=lambda: release.wait(30)))
        )
        await asyncio.sleep(0.05)
        failed = asyncio.ensure_future(thread.run(reply_for(store, "failed", model=broken)))
        ok = asyncio.ensure_future(thread.run(reply_for(store, "ok")))
        release.set()
        return await asyncio.gather(held, failed, ok, return_exceptions=True)

    held, failed, ok = asyncio.run(main())
    assert isinstance(failed, RuntimeError) and str(failed) == "the model broke"
    assert held == [{"prediction_id": "held"}] and ok == [{"prediction_id": "ok"}]
    assert stored(thread) == 2


def test_a_lone_light_job_is_done_on_the_loop_and_logged(store_location, journal):
    store = PredictionStore(store_location)
    thread = thread_for(store, journal)
    ran_on = []

    async def main():
        job = reply_for(store, "p", before=lambda: ran_on.append(threading.current_thread()))
        return await thread.run(job, light=True)

    (reply,) = asyncio.run(main())
    assert ran_on == [threading.main_thread()], "no thread hop for a lone drawing"
    assert reply == {"prediction_id": "p"} and stored(thread) == 1


def test_light_jobs_that_arrive_together_and_heavy_jobs_go_to_the_thread(store_location, journal):
    store = PredictionStore(store_location)
    thread = thread_for(store, journal)
    ran_on: dict[str, str] = {}

    def job(prediction_id: str) -> Job:
        def note() -> None:
            ran_on[prediction_id] = threading.current_thread().name

        return reply_for(store, prediction_id, before=note)

    async def main():
        together = [thread.run(job(f"p{i}"), light=True) for i in range(4)]
        return await asyncio.gather(*together), await thread.run(job("photo"), light=False)

    together, photo = asyncio.run(main())
    assert [r[0]["prediction_id"] for r in together] == ["p0", "p1", "p2", "p3"]
    assert photo == [{"prediction_id": "photo"}] and stored(thread) == 5
    assert set(ran_on.values()) == {"predictions"}, "under load the loop only parses requests"


def test_a_failing_light_job_raises_its_own_error(store_location, journal):
    store = PredictionStore(store_location)
    thread = thread_for(store, journal)

    def bad():
        raise RequestError("not an image")

    with pytest.raises(RequestError, match="not an image"):
        asyncio.run(thread.run(reply_for(store, "bad", before=bad), light=True))
    assert stored(thread) == 0
