"""What one app instance holds while it runs: its settings, metrics, the served models (every version, and the
latest of each), readiness, reload errors, the decode pool the bulk process, the budgets that bound its memory and
the count of requests in progress. The app factory puts one ServeState on ``app.state.serve``; routes reach it with
``state_of(request)``."""

from __future__ import annotations

import asyncio
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request

from export.contract import NAME_PATTERN
from serve.bulk import BulkProcess
from serve.engine import Batcher
from serve.errors import ApiError
from serve.limits import BufferBudget, DecodeBudget
from serve.metrics import Metrics
from serve.model import OnnxModel
from serve.oip import VERSION
from serve.settings import Settings

NOT_READY = "models are not loaded yet (or the server is stopping)"  # the message of every readiness probe's 503


@dataclass(eq=False)
class Served:
    """A loaded model version and its batcher. A request that uses the batcher holds the entry (``hold``), so that
    an entry replaced or removed by a reload (serve/repo.py) answers it before its batcher stops (``retire``)."""

    model: OnnxModel
    batcher: Batcher
    version: str = VERSION
    manifest_sha256: str | None = None
    users: int = field(default=0, init=False)  # requests holding this entry
    _idle: asyncio.Event | None = field(default=None, init=False, repr=False)

    @contextlib.contextmanager
    def hold(self):
        """Around a request's use of this entry (take it with no await after the lookup)."""
        self.users += 1
        try:
            yield self
        finally:
            self.users -= 1
            if not self.users and self._idle is not None:
                self._idle.set()

    async def retire(self) -> None:
        """No longer served (the caller took it out): once the requests that hold it have their answers, stop its
        batcher (cancelled: stop it at once)."""
        try:
            while self.users:
                self._idle = asyncio.Event()
                await self._idle.wait()
        finally:
            await self.batcher.stop()


class ServeState:
    """The settings, metrics and models of one app; ``served`` is filled and ``ready`` set by the app's lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.served: dict[str, Served] = {}  # model name -> its latest version (put/drop keep it)
        self.versions: dict[str, dict[str, Served]] = {}  # model name -> version -> entry
        self.reload_errors: dict[tuple[str, str], str] = {}  # (name, version) -> why its export did not load
        self.ready = False
        # Images above serve.inputs.INLINE_PIXELS decode here, off the event loop, within the decode budget.
        self.decode_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="decode")
        self.bulk = BulkProcess()  # large images and JSON bodies, in a separate process (serve/bulk.py)
        self.decode_budget = DecodeBudget(settings.decode_memory_bytes, self.decode_pool, self.bulk)
        self.buffers = BufferBudget(settings.buffered_bytes)  # bodies and batches of the requests in progress
        self.in_flight = 0  # requests in progress (serve.middleware.Limits)
        self.in_flight_by_client: dict[str, int] = {}  # the same, by client (serve.clients), for those with any
        self.base_rss: int | None = None  # resident bytes once the models were warmed up (the formula's base)

    def lookup(self, name: str) -> Served:
        """The model served as ``name``: 400 for a malformed name, 404 for an unknown one."""
        if not NAME_PATTERN.match(name):
            raise ApiError(400, "invalid_model_name", "model names are letters, digits, '.', '_' and '-' only")
        served = self.served.get(name)
        if served is None:
            raise ApiError(404, "unknown_model", f"no model named {name!r}; GET /v1/models lists them")
        return served

    def lookup_version(self, name: str, version: str | None) -> Served:
        """``lookup(name)`` (its latest version) when ``version`` is None (the request named none), else that version
        of it: 404 for a version it does not serve (an export directory is version VERSION; a repository folder of
        numbered export directories serves each under its number)."""
        served = self.lookup(name)
        if version is None:
            return served
        versions = self.versions.get(name, {})
        entry = versions.get(str(int(version)) if version.isascii() and version.isdecimal() and len(version) < 10
                              else version)
        if entry is None:
            raise ApiError(404, "unknown_version", f"model {name!r} has no version {version!r}; it serves "
                           f"{', '.join(repr(v) for v in self.version_list(name))}")
        return entry

    def version_list(self, name: str) -> list[str]:
        """The versions of ``name`` served, in order."""
        return sorted(self.versions.get(name, {}), key=int)

    def put(self, name: str, entry: Served) -> Served | None:
        """Serve ``entry`` as its version of ``name`` (the latest is the highest-numbered); the entry it replaces,
        which the caller retires, or None. Atomic for requests: nothing is awaited."""
        versions = self.versions.setdefault(name, {})
        old = versions.get(entry.version)
        versions[entry.version] = entry
        self.served[name] = versions[max(versions, key=int)]
        if old is not None:
            self._forget(name, old)
        self.metrics.model_info.labels(name, entry.version, entry.manifest_sha256 or "").set(1)
        self.metrics.reload_failures.labels(name)  # the series exists from the first load, at 0
        return old

    def drop(self, name: str, version: str) -> Served | None:
        """Stop serving ``version`` of ``name`` (the latest becomes the highest-numbered left); the entry taken out,
        which the caller retires, or None."""
        versions = self.versions.get(name, {})
        old = versions.pop(version, None)
        if versions:
            self.served[name] = versions[max(versions, key=int)]
        else:
            self.versions.pop(name, None)
            self.served.pop(name, None)
        if old is not None:
            self._forget(name, old)
        return old

    def _forget(self, name: str, entry: Served) -> None:
        labels = (name, entry.version, entry.manifest_sha256 or "")
        self.metrics.model_info.labels(*labels).set(0)  # 0 stays in a worker's file under --workers N
        with contextlib.suppress(KeyError):
            self.metrics.model_info.remove(*labels)

    def detail(self) -> dict[str, dict]:
        """Per model: the latest version, every version served, the latest's manifest sha256 and, where an export of
        the repository failed to load (the previous one, if any, still serving), ``reload_error``."""
        out: dict[str, dict] = {}
        for name, entry in self.served.items():
            out[name] = {"version": entry.version, "versions": self.version_list(name),
                         "manifest_sha256": entry.manifest_sha256}
        for (name, version), error in sorted(self.reload_errors.items()):
            model = out.setdefault(name, {"version": None, "versions": [], "manifest_sha256": None})
            text = error if version == VERSION else f"version {version}: {error}"
            model["reload_error"] = f"{model['reload_error']}; {text}" if "reload_error" in model else text
        return dict(sorted(out.items()))


def state_of(request: Request) -> ServeState:
    """The ServeState of the app answering ``request``."""
    return request.app.state.serve
