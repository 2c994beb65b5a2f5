"""The bulk process: one separate process per server process for work that takes a core for a second or more while
holding the GIL — parsing large JSON bodies (``json.loads`` holds the GIL from the first byte to the last: 250 ms for
4 MB of empty lists) and decoding large images (Pillow holds it for 15-20 ms at a time in a 40 MP decode). In a
thread either would stop the event loop, so every other client would wait; in this process it shares only the CPU,
and at lower priority (serve.limits.BULK_NICE) at that.

One worker, so jobs run one at a time and its memory is bounded (serve.limits.memory_bound, ``bulk_process``). Jobs
are module-level functions with picklable arguments and results (ApiError pickles). Started with ``start`` (the
server does it at start-up; embedders and tests get it on first use); a process that died (killed for memory) is
replaced on the next job, and the jobs it held fail with 503. Where no process can be started at all (the
interpreter cannot be executed again by the server's user, the resource tracker cannot start: sandboxes, some container
set-ups), the server says so once in its log and runs the same jobs on one thread instead: one at a time, so the memory
bound holds, but large decodes and JSON bodies then share the server's GIL.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from serve.errors import ApiError

PARENT_CHECK_S = 1.0  # how often the bulk process checks that the server process is still there
log = logging.getLogger("serve")


def _child_init() -> None:
    """Ctrl-C is the server's to handle; freed memory goes back to the system; lower CPU priority than the server;
    the process ends when the server process does, however it ends (killed, too)."""
    from serve.limits import BULK_NICE, tune_malloc

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_malloc()
    with contextlib.suppress(OSError, AttributeError):
        os.nice(BULK_NICE)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _in_child(fn, *args):
    try:
        return fn(*args)
    finally:
        from serve.limits import trim_malloc

        trim_malloc()  # the job's objects are freed by now: give the memory back


class BulkProcess:
    """A one-process pool with a ``submit`` like an Executor's (DecodeBudget runs large decodes on it)."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._worked = False  # a job has completed in a bulk process: a later failure is a death, not a set-up fault
        self._thread: ThreadPoolExecutor | None = None  # the fallback where no process can be started at all

    def start(self) -> None:
        """Start the process now, in the background, so that the first job does not wait for it."""
        if self._pool is None and self._thread is None:
            try:
                # spawn, not fork: the server process runs ONNX Runtime and decode threads, which a fork would copy
                pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_child_init)
                warm_up = pool.submit(int)
            except (OSError, BrokenProcessPool) as exc:
                self._fall_back(exc)
                return
            self._pool = pool
            warm_up.add_done_callback(lambda done: self._first_job_done(pool, done))

    def _first_job_done(self, pool: ProcessPoolExecutor, done: Future) -> None:
        if done.cancelled():
            return
        exc = done.exception()
        if exc is None:
            self._worked = True
        elif isinstance(exc, BrokenProcessPool) and not self._worked:
            self._forget(pool)
            self._fall_back(exc)

    def _fall_back(self, exc: BaseException) -> None:
        if self._thread is None:
            log.warning("no bulk process can be started (%s: %s); large images and JSON bodies are handled on one "
                        "thread of this process instead", type(exc).__name__, exc or "its process exited at once")
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="bulk")

    @property
    def in_process(self) -> bool:
        """True where jobs run on the fallback thread (no bulk process could be started)."""
        return self._thread is not None

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
            self._thread = None

    def submit(self, fn, *args) -> Future:
        """``fn(*args)`` in the bulk process. If the process dies meanwhile, the future raises BrokenProcessPool (the
        app answers 503) and the next job gets a fresh process."""
        for _ in range(2):
            self.start()
            if self._thread is not None:
                return self._thread.submit(_in_child, fn, *args)
            pool = self._pool
            try:
                future = pool.submit(_in_child, fn, *args)
                break
            except BrokenProcessPool:  # it died since the last job: replace it
                self._forget(pool)
        else:
            raise ApiError(503, "overloaded", "the bulk process cannot be started; retry")

        def check(done: Future) -> None:
            if not done.cancelled() and isinstance(done.exception(), BrokenProcessPool):
                self._forget(pool)

        future.add_done_callback(check)
        return future

    def _forget(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
