"""Server settings: one frozen dataclass the CLI fills in and tests override."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from transfer.errors import UserError

ENV_VAR = "TRANSFER_SERVE_SETTINGS"  # how `--workers N` hands the settings to each worker process


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2 CPU quota: "max 100000" or "<quota> <period>"


def available_cores(cpu_max: str = CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (``docker run --cpus``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max":
            cores = min(cores or 1, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return cores or 1


@dataclass(frozen=True)
class Settings:
    """What to serve and how; invalid values raise UserError on construction."""

    export_dirs: tuple[str, ...] = ()  # each served under its manifest name
    model_repo: str | None = None  # every export directory below it, each under its folder name
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_batch: int = 32
    batch_timeout_ms: float = 5.0
    threads: int = 0  # ONNX Runtime intra-op threads per inference stream (0 = auto, see parallelism())
    streams: int = 0  # batches of one model that run at the same time (0 = auto)
    api_key: str | None = field(default=None, repr=False)
    max_body_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000  # per image, checked on the header before decoding
    max_images: int = 64  # per request
    request_timeout_s: float = 30.0
    max_queue_images: int = 4096  # beyond this the server sheds load with 503 instead of queueing forever
    default_top_k: int = 5
    warmup: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "export_dirs", tuple(str(p) for p in self.export_dirs))
        if not self.export_dirs and not self.model_repo:
            raise UserError("nothing to serve: give an EXPORT_DIR or --model-repo DIR")
        positive = ("max_batch", "workers", "max_body_bytes", "max_pixels", "max_images", "max_queue_images",
                    "default_top_k")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        for name in ("batch_timeout_ms", "threads", "streams"):
            if getattr(self, name) < 0:
                raise UserError(f"{name.replace('_', '-')}={getattr(self, name)} must be >= 0")
        if self.request_timeout_s <= 0:
            raise UserError(f"request-timeout={self.request_timeout_s} must be > 0")
        if not 0 <= self.port <= 65535:
            raise UserError(f"port={self.port} is out of range 0..65535")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key is empty; omit it to disable authentication")

    def parallelism(self, cores: int | None = None) -> tuple[int, int]:
        """(intra-op threads, streams) per model in one worker process, filling its share of the cores.

        Auto prefers streams of one thread each: on small CPU models several batches running side by side beat
        one batch split across threads (measured by benchmarks/serve_load.py, which reports both raw figures).
        """
        cores = cores or available_cores()
        share = max(1, cores // self.workers)
        if self.threads and self.streams:
            return self.threads, self.streams
        if self.threads:
            return self.threads, max(1, share // self.threads)
        if self.streams:
            return max(1, share // self.streams), self.streams
        return 1, share

    def to_env(self) -> str:
        """JSON for ENV_VAR (the API key included: the environment of our own worker processes)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from ENV_VAR, as written by ``to_env``."""
        raw = json.loads(os.environ[ENV_VAR])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})
