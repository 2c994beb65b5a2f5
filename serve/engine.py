"""Dynamic batching: concurrent requests for a model are coalesced into ONNX Runtime batches run off the event loop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from serve.metrics import Metrics
from serve.model import OnnxModel

SWITCH_INTERVAL_S = 0.0005


def tune_switch_interval() -> None:
    """Shorten the GIL switch interval of a server process (not called by create_app: embedders keep theirs).

    Inference threads need the GIL for a moment to start and to finish each batch; under load the event loop holds
    it for up to the switch interval (5 ms by default) while the inference cores sit idle. 0.5 ms served 5-10% more
    requests per second in paired runs of benchmarks/serve_load.py on a 2-core machine.
    """
    sys.setswitchinterval(SWITCH_INTERVAL_S)


class Overloaded(Exception):
    """The queue is full: the caller should answer 503 and the client retry later."""


@dataclass
class _Item:
    images: np.ndarray  # (n, H, W, 3) float32, n <= max_batch
    future: asyncio.Future


class Batcher:
    """One model's queue and batching loop.

    A batch is closed when it holds ``max_batch`` images, or when ``timeout_s`` has passed since its first image,
    or at once when no other request is on its way (``expecting``), so a lone client never waits for company.
    Requests larger than ``max_batch`` are split. Up to ``streams`` batches run at once, each on its own thread
    (ONNX Runtime sessions are thread-safe); the next batch is only formed when a stream is free, so requests
    queue up while every stream is busy, which is where coalescing comes from under load.
    """

    def __init__(self, model: OnnxModel, max_batch: int, timeout_s: float, metrics: Metrics,
                 max_queue_images: int = 4096, streams: int = 1) -> None:
        self.model, self.max_batch, self.timeout_s = model, max_batch, timeout_s
        self.metrics, self.max_queue_images, self.streams = metrics, max_queue_images, streams
        self._pending: collections.deque[_Item] = collections.deque()
        self._queued_images = 0
        self._expecting = 0
        self._wake: asyncio.Event | None = None
        self._free: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=streams, thread_name_prefix=f"ort-{model.name}")
        # This model's metric series, looked up once (labels() takes a lock and checks its arguments every call).
        self._depth = metrics.queue_depth.labels(model.name)
        self._batch_sizes = metrics.batch_size.labels(model.name)
        self._inference = metrics.inference.labels(model.name)
        self.images_counter = metrics.images.labels(model.name)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._free = asyncio.Semaphore(self.streams)
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.model.name}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._running):  # batches already on a stream finish and answer their requests
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(Overloaded("server is shutting down"))
        self._pending.clear()
        self._executor.shutdown(wait=True)

    def expect(self) -> _Expectation:
        """Context manager around a request's decoding: tells the loop that more images are on their way."""
        return _Expectation(self)

    async def infer(self, images: np.ndarray, expectation: _Expectation | None = None) -> np.ndarray:
        """Probabilities for (n, H, W, 3) float32 images, n >= 1; raises Overloaded when the queue is full.

        ``expectation`` (from ``expect()``) is released once the images are queued.
        """
        if expectation is not None:
            expectation.release()
        if self._queued_images + len(images) > self.max_queue_images:
            raise Overloaded(f"{self._queued_images} images are queued for {self.model.name}; retry later")
        loop = asyncio.get_running_loop()
        items = [_Item(images[i:i + self.max_batch], loop.create_future())
                 for i in range(0, len(images), self.max_batch)]
        for item in items:
            self._pending.append(item)
            self._queued_images += len(item.images)
        self._depth.set(self._queued_images)
        self._wake.set()
        try:
            if len(items) == 1:
                return await items[0].future
            results = await asyncio.gather(*(item.future for item in items))
        except asyncio.CancelledError:
            for item in items:  # a timed-out request leaves no work behind
                item.future.cancel()
            raise
        return np.concatenate(results)

    def _take(self) -> _Item | None:
        while self._pending:
            item = self._pending.popleft()
            self._queued_images -= len(item.images)
            if not item.future.done():
                return item
        return None

    async def _next_batch(self) -> list[_Item]:
        while True:
            self._wake.clear()
            first = self._take()
            if first is not None:
                break
            await self._wake.wait()
        batch, count = [first], len(first.images)
        deadline = time.monotonic() + self.timeout_s
        while count < self.max_batch:
            if self._pending:
                if count + len(self._pending[0].images) > self.max_batch:
                    break
                item = self._take()
                if item is not None:
                    batch.append(item)
                    count += len(item.images)
                continue
            remaining = deadline - time.monotonic()
            if self._expecting == 0 or remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        return self.model.run(images), time.perf_counter() - started

    async def _loop(self) -> None:
        while True:
            await self._free.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._free.release()
                raise
            self._depth.set(self._queued_images)
            task = asyncio.create_task(self._dispatch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _dispatch(self, batch: list[_Item]) -> None:
        """Run one batch on a free stream and hand each request its rows; always gives the stream back."""
        try:
            images = batch[0].images if len(batch) == 1 else np.concatenate([item.images for item in batch])
            loop = asyncio.get_running_loop()
            try:
                probabilities, seconds = await loop.run_in_executor(self._executor, self._run, images)
            except Exception as exc:  # handed to the waiting requests, which answer 500; the loop lives on
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                return
            self._batch_sizes.observe(len(images))
            self._inference.observe(seconds)
            start = 0
            for item in batch:
                end = start + len(item.images)
                if not item.future.done():
                    item.future.set_result(probabilities[start:end])
                start = end
        finally:
            self._free.release()


class _Expectation:
    def __init__(self, batcher: Batcher) -> None:
        self.batcher, self.active = batcher, False

    def __enter__(self) -> _Expectation:
        self.batcher._expecting += 1
        self.active = True
        return self

    def release(self) -> None:
        if self.active:
            self.active = False
            self.batcher._expecting -= 1

    def __exit__(self, *exc) -> None:
        if self.active:
            self.release()
            if self.batcher._wake is not None:
                self.batcher._wake.set()  # a batch that was waiting for this request need not wait any longer
