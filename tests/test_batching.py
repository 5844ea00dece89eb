"""GreedyBatcher: a lone call runs at once; calls made while a batch runs go together next."""

import asyncio
import threading
import time

import numpy as np
import pytest

from digitops.inference.batching import GreedyBatcher


class Recorder:
    """A forward pass that doubles its inputs, records each batch's size, and can be held."""

    def __init__(self, seconds: float = 0.0):
        self.sizes: list[int] = []
        self.seconds = seconds
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            self.sizes.append(len(x))
        time.sleep(self.seconds)
        return x * 2


def test_lone_call_runs_at_once_alone():
    forward = Recorder()
    batcher = GreedyBatcher(forward)

    async def main():
        started = time.perf_counter()
        out = await batcher(np.array([[1.0]]))
        return out, time.perf_counter() - started

    out, elapsed = asyncio.run(main())
    assert out.tolist() == [[2.0]] and forward.sizes == [1]
    assert elapsed < 0.5  # no waiting for company (a generous bound: this is not a benchmark)


def test_calls_during_a_batch_run_together_next_and_each_gets_its_own_rows():
    forward = Recorder(seconds=0.2)
    batcher = GreedyBatcher(forward)

    async def main():
        first = asyncio.create_task(batcher(np.array([[0.0]])))
        await asyncio.sleep(0.05)  # the first batch is running now
        rest = [batcher(np.full((i % 3 + 1, 1), float(i))) for i in range(1, 11)]
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert first.tolist() == [[0.0]]
    for i, out in enumerate(rest, start=1):
        assert out.tolist() == [[2.0 * i]] * (i % 3 + 1)
    assert forward.sizes == [1, sum(i % 3 + 1 for i in range(1, 11))]
    assert batcher.batches == 2


def test_batches_respect_the_size_limit_but_never_split_a_call():
    forward = Recorder(seconds=0.1)
    batcher = GreedyBatcher(forward, max_batch_size=4)

    async def main():
        first = asyncio.create_task(batcher(np.zeros((1, 1))))
        await asyncio.sleep(0.02)
        return await asyncio.gather(first, *(batcher(np.zeros((n, 1))) for n in (3, 2, 6, 1)))

    outs = asyncio.run(main())
    assert [len(o) for o in outs] == [1, 3, 2, 6, 1]
    # 3 + 2 would pass 4, so 3 runs alone, then 2; the 6 runs whole, on its own; then the 1.
    assert forward.sizes == [1, 3, 2, 6, 1]


def test_a_failing_forward_fails_its_batch_only():
    calls = []

    def forward(x):
        calls.append(len(x))
        if len(calls) == 1:
            time.sleep(0.1)
            raise RuntimeError("out of memory")
        return x

    batcher = GreedyBatcher(forward)

    async def main():
        first = asyncio.create_task(batcher(np.zeros((1, 1))))
        await asyncio.sleep(0.02)
        second = batcher(np.ones((2, 1)))
        with pytest.raises(RuntimeError, match="out of memory"):
            await first
        return await second

    assert asyncio.run(main()).tolist() == [[1.0], [1.0]]
