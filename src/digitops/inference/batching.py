"""Batching of concurrent requests' forward passes without waiting on purpose.

A request that finds the model free runs at once; requests that arrive while a batch runs queue
up and run together as the next batch. Batches grow with the load and no request ever waits for
company (Triton's dynamic batcher with a zero queue delay works the same way).

BentoML's CorkDispatcher waits for company by the average wait it has seen lately: after a burst
of concurrent requests, a lone request waited ~100 ms for partners that never came.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

import anyio
import numpy as np


class GreedyBatcher:
    """Call with inputs [n, ...]; get `forward`'s outputs [n, ...] for them, computed in a batch
    with whatever other calls are waiting. `forward` runs in a worker thread, one batch at a time.
    """

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 64):
        self.forward = forward
        self.max_batch_size = max_batch_size
        self._waiting: collections.deque[tuple[np.ndarray, asyncio.Future]] = collections.deque()
        self._running = False
        self.batches = 0  # forward calls made

    async def __call__(self, inputs: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((inputs, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch = [self._waiting.popleft()]
                size = len(batch[0][0])
                while self._waiting and size + len(self._waiting[0][0]) <= self.max_batch_size:
                    batch.append(self._waiting.popleft())
                    size += len(batch[-1][0])
                await self._run(batch)
        finally:
            self._running = False

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        inputs = [item for item, _ in batch]
        try:
            outputs = await anyio.to_thread.run_sync(self.forward, np.concatenate(inputs))
            self.batches += 1
        except Exception as err:  # every caller in the batch hears of it
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        start = 0
        for item, future in batch:
            if not future.done():  # a caller may have gone (client disconnected)
                future.set_result(outputs[start : start + len(item)])
            start += len(item)
