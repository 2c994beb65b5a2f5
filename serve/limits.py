"""What bounds a server process's memory: two byte budgets, the open-file limit, the allocator settings, and the
worst-case formula they add up to (docs/serve.md, "Limits"; ``memory_bound`` is that formula, the one home of it).

- ``DecodeBudget``: bytes that image decodes in progress (on threads or in the bulk process) may hold together. A
  decode waits (first come, first served) until its cost, estimated from the image header
  (serve.inputs.decode_cost), is free; the cost is given back when the decode finishes, not when the request gives
  up, so a timed-out request's decode still counts.
- ``BufferBudget``: bytes that request bodies (as they arrive) and decoded batches hold together. It never waits: a
  request that would overdraw it is refused with 503 and Retry-After (serve.middleware).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import resource
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from serve.settings import MB, Settings

# File descriptors kept for everything but client connections: the listening socket, model files, the decode and
# ONNX Runtime threads' files, the JSON parser's pipes, log files.
RESERVED_FDS = 64


# The bulk process (serve/bulk.py) runs at this much lower CPU priority: its jobs take a core for a second or more,
# and on a busy machine they should not hold up the small requests around them.
BULK_NICE = 10
# Decodes that cost more than this (a ~5 MP RGB PNG, ~0.1 s) run in the bulk process, smaller ones on threads.
BULK_DECODE_COST = 64 * MB


class DecodeBudget:
    """A weighted, first-come-first-served semaphore over ``total`` bytes, for work that runs on ``executor``
    (on ``bulk_executor``, the bulk process, for decodes costing more than BULK_DECODE_COST)."""

    def __init__(self, total: int, executor: Executor, bulk_executor: Executor | None = None) -> None:
        self.total, self.available, self.executor = total, total, executor
        self.bulk_executor = bulk_executor or executor
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self.peak_in_use = 0  # the most bytes held at once (tests hold the server to its formula with it)

    async def run(self, cost: int, fn: Callable, *args):
        """``fn(*args)`` on the executor once ``cost`` bytes are free; they are given back when ``fn`` returns."""
        cost = min(cost, self.total)  # callers refuse larger costs beforehand; never wait forever
        await self._acquire(cost)
        loop = asyncio.get_running_loop()
        try:
            executor = self.bulk_executor if cost > BULK_DECODE_COST else self.executor
            future = executor.submit(fn, *args)
        except BaseException:
            self._release(cost)
            raise

        def done(_):
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone, nothing to give back
                loop.call_soon_threadsafe(self._release, cost)

        future.add_done_callback(done)
        # Cancelling the wrapper cancels a decode that has not started (its callback then gives the bytes back) and
        # leaves a running one to finish: its bytes are given back only when the thread is done with them.
        return await asyncio.wrap_future(future)

    async def _acquire(self, cost: int) -> None:
        if not self._waiters and self.available >= cost:
            self._take(cost)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((cost, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted just as we were cancelled: hand it on
                self._release(cost)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((cost, waiter))
                self._wake()
            raise

    def _take(self, cost: int) -> None:
        self.available -= cost
        self.peak_in_use = max(self.peak_in_use, self.total - self.available)

    def _release(self, cost: int) -> None:
        self.available += cost
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            cost, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if cost > self.available:
                return  # first come, first served: a large decode is not starved by small ones behind it
            self._waiters.popleft()
            self._take(cost)
            waiter.set_result(None)


class BudgetSpent(Exception):
    """A request would overdraw the BufferBudget: answered 503 with Retry-After."""


class BufferBudget:
    """Bytes held by request bodies and decoded batches across the requests in progress (never waits)."""

    def __init__(self, total: int) -> None:
        self.total, self.in_use, self.peak_in_use = total, 0, 0

    def take(self, n: int) -> None:
        if self.in_use + n > self.total:
            raise BudgetSpent(f"requests in progress already hold {self.in_use / MB:.0f} MB of the server's "
                              f"{self.total / MB:.0f} MB for bodies and pixels; retry later")
        self.in_use += n
        self.peak_in_use = max(self.peak_in_use, self.in_use)

    def give_back(self, n: int) -> None:
        self.in_use -= n


HELD_KEY = "serve.held"  # where the middleware keeps a request's Held in its ASGI scope


@dataclass
class Held:
    """What one request holds of the BufferBudget (kept in its ASGI scope; given back when the request ends)."""

    budget: BufferBudget
    amount: int = 0

    def take(self, n: int) -> None:
        self.budget.take(n)
        self.amount += n

    def give_back_all(self) -> None:
        self.budget.give_back(self.amount)
        self.amount = 0


def open_file_limit() -> int:
    """The soft limit on open files of this process."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_limit(settings: Settings) -> int:
    """``max_connections``, lowered so that connections never exhaust the open-file limit (accept would fail)."""
    return max(1, min(settings.max_connections, open_file_limit() - RESERVED_FDS))


def client_request_limit(settings: Settings) -> int:
    """Requests in progress one client may hold (serve.clients): ``max_requests_per_client``, or 3/4 of
    ``max_concurrent_requests`` when it is 0 (auto), so that one client never holds every slot while another waits;
    at most ``max_concurrent_requests`` (a larger value turns the limit off)."""
    limit = settings.max_requests_per_client or max(1, settings.max_concurrent_requests * 3 // 4)
    return min(limit, settings.max_concurrent_requests)


# Bytes of memory per byte of JSON text that a document passing serve.jsonparse's array count costs the parser at most
# (measured: pixel arrays ``[[[0,0,0],...]]`` 18, flat numbers 12-13, strings 5; what costs more, like ``[[],[],...]``
# at 36, is refused before parsing).
JSON_EXPANSION = 24
# The bulk process before its first job (Python, NumPy, Pillow; measured ~50 MB).
BULK_PROCESS_BASE = 64 * MB
# What a request queued behind another on a pipelining connection costs besides its head (uvicorn's request cycle,
# scope and events; measured ~2.5 KB for a `GET /healthz`), and what a connection may hold that it read and has not
# parsed (one read of the event loop's transport, 256 KB) when its queue is full (serve.protocol).
QUEUED_REQUEST_BYTES = 4 * 1024
READ_BYTES = 256 * 1024


def memory_bound(settings: Settings, base: int) -> dict[str, int]:
    """The worst-case resident memory of one worker process and its bulk process, term by term (bytes), for ``base``
    measured after start-up and warm-up; ``total`` is their sum.
    """
    from serve.inputs import INLINE_COST

    terms = {
        "base": base,
        "decode": settings.decode_memory_bytes,  # decodes in progress, on threads or in the bulk process
        "buffers": 2 * settings.buffered_bytes,  # bodies and batches (BufferBudget), x2 while a body is joined
        "headers": connection_limit(settings) * settings.max_header_bytes,  # request heads being received
        # per pipelining connection: the heads queued (at most max_header_bytes together), the queued requests, and
        # one read held while the queue is full
        "pipelined": connection_limit(settings) * (settings.max_header_bytes + settings.max_pipelined
                                                   * QUEUED_REQUEST_BYTES + READ_BYTES),
        "inline": INLINE_COST,  # one small image decoded on the event loop
        # the bulk process: its own start-up memory, and one JSON document parsed (or one decode: counted above)
        "bulk_process": BULK_PROCESS_BASE + JSON_EXPANSION * settings.max_json_bytes,
    }
    terms["total"] = sum(terms.values())
    return terms


def tune_malloc() -> None:
    """Make glibc return large freed blocks to the system at once (server processes only, like the GIL interval).

    Decoded images are freed in blocks of megabytes; by default glibc raises its mmap threshold after the first such
    free and then serves the next ones from heaps it rarely gives back, so a burst of large images left the process
    gigabytes larger for good. A fixed 1 MB threshold keeps large blocks mmap'ed (freed = returned). No-op off glibc.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 * MB)
        libc.mallopt(m_trim_threshold, 8 * MB)


def trim_malloc() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``); no-op elsewhere."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)
