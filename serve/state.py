"""What one app instance holds while it runs: its settings, metrics, the served models, readiness, the decode pool
the bulk process, the budgets that bound its memory and the count of requests in progress. The app factory puts
one ServeState on ``app.state.serve``; routes reach it with ``state_of(request)``."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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


@dataclass
class Served:
    """A loaded model and its batcher."""

    model: OnnxModel
    batcher: Batcher


class ServeState:
    """The settings, metrics and models of one app; ``served`` is filled and ``ready`` set by the app's lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.served: dict[str, Served] = {}
        self.ready = False
        # Images above serve.inputs.INLINE_PIXELS decode here, off the event loop, within the decode budget.
        self.decode_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="decode")
        self.bulk = BulkProcess()  # large images and JSON bodies, in a separate process (serve/bulk.py)
        self.decode_budget = DecodeBudget(settings.decode_memory_bytes, self.decode_pool, self.bulk)
        self.buffers = BufferBudget(settings.buffered_bytes)  # bodies and batches of the requests in progress
        self.in_flight = 0  # requests in progress (serve.middleware.Limits)
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
        """``lookup(name)``, and 404 for a version other than VERSION (an export directory is one version); None:
        the request named no version."""
        served = self.lookup(name)
        if version is not None and version != VERSION:
            raise ApiError(404, "unknown_version", f"model {name!r} has no version {version!r}; its one version is "
                           f"{VERSION!r}")
        return served


def state_of(request: Request) -> ServeState:
    """The ServeState of the app answering ``request``."""
    return request.app.state.serve
