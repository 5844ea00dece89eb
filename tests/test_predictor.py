"""The prediction thread: a round's images prepared, one forward pass per model, their rows
journaled in one append before any reply goes out, and replies that say truthfully whether
their row was logged."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from digitops.data import mnist
from digitops.inference.journal import PredictionJournal
from digitops.inference.metrics import ServiceMetrics
from digitops.inference.predictor import Job, PredictionThread
from digitops.inference.preprocess import Options
from digitops.inference.store import PredictionStore


class Model:
    """A served model that answers every image with fixed probabilities (a blank input gets
    digit score 0, anything else 0.5), and notes the size of each forward pass. `gate`, when
    set, holds the first pass until it is released."""

    threshold = 0.01

    def __init__(self, digit: int = 3, fails: bool = False, gate: threading.Event | None = None):
        self.answer = np.full(10, 0.01, dtype=np.float32)
        self.answer[digit] = 0.91
        self.fails, self.gate = fails, gate
        self.passes: list[int] = []

    def answers(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
        if self.gate is not None:
            self.gate.wait(10)
            self.gate = None
        if self.fails:
            raise RuntimeError("the model broke")
        self.passes.append(len(pixels))
        scores = np.where(pixels.reshape(len(pixels), -1).any(axis=1), 0.5, 0.0)
        return np.tile(self.answer, (len(pixels), 1)), scores, None

    def identity(self) -> dict:
        return {"name": "digit-cnn", "version": "7", "mlflow_run_id": None, "data_version": None}


@pytest.fixture(scope="module")
def image(mnist_dir) -> bytes:
    pixels = mnist.load(mnist_dir, "t10k")[0][0]
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((140, 140)).save(buf, format="PNG")
    return buf.getvalue()


def blank() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, format="PNG")
    return buf.getvalue()


def thread_for(store) -> tuple[PredictionThread, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry=registry)
    journal = None
    if store is not None:
        directory = Path(f"{store.path}.journal")
        journal = PredictionJournal(store, directory, metrics.store_failures.inc)
    return PredictionThread(journal, metrics), registry


def run(thread: PredictionThread, *jobs: Job) -> list:
    async def main():
        return await asyncio.gather(*(thread.run(job) for job in jobs), return_exceptions=True)

    return asyncio.run(main())


def test_a_reply_says_logged_only_once_its_row_is_in_the_store(tmp_path, image):
    store = PredictionStore(tmp_path / "p.db")
    thread, _ = thread_for(store)
    ((reply,),) = run(thread, Job([image], Options(), Model()))
    assert reply["digit"] == 3 and "logged" not in reply
    assert thread.journal.flush() and store.stats()["predictions"] == 1
    ((preview,),) = run(thread, Job([image], Options(), Model(), log=False))
    assert preview["logged"] is False
    assert thread.journal.flush() and store.stats()["predictions"] == 1


def test_requests_that_queue_up_share_one_forward_pass_per_model(tmp_path, image):
    gate = threading.Event()
    first, second = Model(gate=gate), Model(digit=5)
    thread, _ = thread_for(PredictionStore(tmp_path / "p.db"))

    async def main():
        # Two at once: neither is alone, so both go to the thread, which the gate holds.
        busy = [asyncio.ensure_future(thread.run(Job([image], Options(), first))) for _ in "ab"]
        await asyncio.sleep(0.2)
        queued = [thread.run(Job([image] * 2, Options(), m)) for m in (first, second, first)]
        waiting = asyncio.gather(*queued)
        await asyncio.sleep(0.1)
        gate.set()
        return await asyncio.gather(*busy), await waiting

    _, (a, b, c) = asyncio.run(main())
    # Two rounds: the busy one, then one forward pass per model for all that queued meanwhile.
    assert len(first.passes) == 2 and sum(first.passes) == 6 and second.passes == [2]
    assert [r["digit"] for r in a + c] == [3] * 4 and [r["digit"] for r in b] == [5, 5]


def test_a_request_alone_is_done_on_the_event_loop(tmp_path, image):
    thread, _ = thread_for(PredictionStore(tmp_path / "p.db"))
    seen = []

    class Watched(Model):
        def answers(self, pixels):
            seen.append(threading.current_thread().name)
            return super().answers(pixels)

    run(thread, Job([image], Options(), Watched()))
    assert seen == [threading.main_thread().name]


def test_a_bad_image_fails_its_request_alone_or_only_itself_in_a_batch_a_blank_is_answered(
    tmp_path, image
):
    store = PredictionStore(tmp_path / "p.db")
    thread, registry = thread_for(store)
    lone, batch, good = run(
        thread,
        Job([blank()], Options(), Model()),
        Job([image, b"not an image", blank()], Options(), Model(), alone=False),
        Job([image], Options(), Model()),
    )
    assert lone == [{**lone[0], "is_digit": False, "digit_score": 0.0}]  # a blank: answered
    assert [r.get("status") for r in batch] == [None, 400, None]
    assert [r.get("is_digit") for r in batch] == [True, None, False]
    assert good[0]["digit"] == 3 and good[0]["is_digit"]
    assert thread.journal.flush() and store.stats()["predictions"] == 4
    assert registry.get_sample_value("digitops_not_a_digit_total") == 2
    assert [i["digit_score"] for i in store.review_queue(10, "entropy", digits=False)] == [0, 0]


def test_a_failing_model_fails_only_its_own_jobs(tmp_path, image):
    thread, _ = thread_for(PredictionStore(tmp_path / "p.db"))
    broken, fine = run(
        thread, Job([image], Options(), Model(fails=True)), Job([image], Options(), Model())
    )
    assert isinstance(broken, RuntimeError) and fine[0]["digit"] == 3
    ((after,),) = run(thread, Job([image], Options(), Model()))  # the thread goes on
    assert after["digit"] == 3


def test_without_a_store_or_its_journal_predictions_go_on_and_say_unlogged(tmp_path, image):
    thread, registry = thread_for(None)
    ((reply,),) = run(thread, Job([image], Options(), Model()))
    assert reply["digit"] == 3 and reply["logged"] is False
    thread, registry = thread_for(PredictionStore(tmp_path / "p.db"))
    thread.journal._file = open("/dev/full", "ab", buffering=0)  # noqa: SIM115 - disk full
    ((reply,),) = run(thread, Job([image], Options(), Model()))
    assert reply["digit"] == 3 and reply["logged"] is False
    assert registry.get_sample_value("digitops_store_write_failures_total") == 1


def test_noise_is_added_as_asked_and_kept_in_the_row(tmp_path, image):
    store = PredictionStore(tmp_path / "p.db")
    thread, _ = thread_for(store)
    (a,), (b,), (clean,) = run(
        thread,
        Job([image], Options(noise=0.3, seed=1), Model()),
        Job([image], Options(noise=0.3, seed=1), Model()),
        Job([image], Options(), Model()),
    )
    assert a["input_png"] == b["input_png"] != clean["input_png"]
    assert thread.journal.flush()
    assert len(store.review_queue(10, "entropy")) == 1  # noisy inputs are not candidates
