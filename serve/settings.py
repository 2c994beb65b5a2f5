"""Server settings: one frozen dataclass, the one home of the server's defaults (`transfer serve` builds its flags from
its fields), filled in by the CLI and overridden by tests."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from transfer.config import option
from transfer.errors import UserError

MB = 2**20
PRECISIONS = ("fp32", "int8")  # --precision: which ONNX artifact of each export is served (serve.model.served_format)
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

    export_dirs: tuple[str, ...] = option((), "export directories, each served under its folder name", cli=False)
    model_repo: str | None = option(None, "serve every export directory under DIR (or its numbered version folders "
                                    "NAME/1, NAME/2, ...), each by folder name; watched, see --repo-poll-s",
                                    metavar="DIR", default_text="none")
    repo_poll_s: float = option(2.0, "seconds between looks at --model-repo for exports added, replaced or removed, "
                                "applied without a restart (0: read once at start)", metavar="S", minimum=0)
    precision: str = option("fp32", "serve each export's float ONNX model (fp32) or its verified int8 one (int8: "
                            "onnx_int8, made by `transfer export RUN_DIR --formats onnx_int8`)", choices=PRECISIONS)
    host: str = option("127.0.0.1", "interface to bind (127.0.0.1: loopback only)")
    port: int = option(8080, "TCP port")
    workers: int = option(1, "server processes (each loads every model)")
    max_batch: int = option(32, "largest inference batch")
    batch_timeout_ms: float = option(5.0, "how long a batch waits for more requests on their way")
    threads: int = option(0, "ONNX Runtime intra-op threads per inference stream (0 = auto)")
    streams: int = option(0, "batches of one model run at the same time (0 = auto: one 1-thread stream per core)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1 (or set TRANSFER_SERVE_API_KEY)",
                                 metavar="KEY", default_text="none", repr=False)
    max_body_bytes: int = option(16 * MB, "largest request body", cli=False)  # flag: --max-body-mb
    max_json_bytes: int = option(8 * MB, "largest JSON body", cli=False)  # flag: --max-json-mb
    max_pixels: int = option(40_000_000, "largest image, in pixels (checked on the header before decoding)")
    max_request_pixels: int = option(100_000_000, "most pixels per request, all its images together (checked on "
                                     "the headers before decoding)")
    max_images: int = option(64, "most images per request")
    request_timeout_s: float = option(30.0, "seconds per request", flag="request-timeout")
    # Memory and connection limits (docs/serve.md, "Limits": the worst-case memory formula they add up to).
    decode_memory_bytes: int = option(640 * MB, "memory all decodes in progress may hold together", cli=False)
    buffered_bytes: int = option(128 * MB, "memory request bodies and decoded batches may hold together", cli=False)
    max_concurrent_requests: int = option(128, "requests in progress at once (beyond: 503 with Retry-After; "
                                          "health probes and /metrics are not counted)")
    max_requests_per_client: int = option(0, "requests in progress one client address (IPv6: its /64) may hold "
                                          "(beyond: 429 with Retry-After; 0 = auto: 3/4 of "
                                          "--max-concurrent-requests; behind a reverse proxy, whose one address "
                                          "all requests come from, set it to --max-concurrent-requests: off)")
    max_connections: int = option(1000, "open connections (beyond: an idle connection of the client address "
                                  "holding the most is closed, else 503; lowered to fit the open-file limit)")
    header_timeout_s: float = option(10.0, "seconds a client has to send a request's headers (then 408, closed)",
                                     flag="header-timeout")
    keep_alive_s: float = option(5.0, "seconds an idle keep-alive connection stays open", flag="keep-alive")
    max_header_bytes: int = option(32 * 1024, "largest request head (request line and headers; beyond: 431)")
    max_pipelined: int = option(16, "requests one connection may have queued behind the one being answered "
                                "(HTTP pipelining; beyond, the server stops reading it until answers are sent)")
    write_timeout_s: float = option(10.0, "seconds a connection's answers may wait for a client that does not read "
                                    "them (then closed)", flag="write-timeout")
    max_queue_images: int = option(4096, "images queued per model before the server sheds load with 503")
    default_top_k: int = option(5, "labels per image when a request gives no top_k")
    warmup: bool = option(True, "run each model once at every batch size before serving", cli=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "export_dirs", tuple(str(p) for p in self.export_dirs))
        if not self.export_dirs and not self.model_repo:
            raise UserError("nothing to serve: give an EXPORT_DIR or --model-repo DIR")
        positive = ("max_batch", "workers", "max_body_bytes", "max_json_bytes", "max_pixels", "max_request_pixels",
                    "max_images", "max_queue_images", "default_top_k", "decode_memory_bytes", "buffered_bytes",
                    "max_concurrent_requests", "max_connections", "max_header_bytes", "max_pipelined")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        for name in ("batch_timeout_ms", "threads", "streams", "max_requests_per_client"):
            if getattr(self, name) < 0:
                raise UserError(f"{name.replace('_', '-')}={getattr(self, name)} must be >= 0")
        for name, flag in (("request_timeout_s", "request-timeout"), ("header_timeout_s", "header-timeout"),
                           ("keep_alive_s", "keep-alive"), ("write_timeout_s", "write-timeout")):
            if not getattr(self, name) > 0:  # NaN too
                raise UserError(f"{flag}={getattr(self, name)} must be > 0")
        if not 0 <= self.repo_poll_s < math.inf:  # NaN too
            raise UserError(f"repo-poll-s={self.repo_poll_s} must be a number of seconds >= 0")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown --precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.max_header_bytes < 1024:
            raise UserError(f"max-header-bytes={self.max_header_bytes} must be >= 1024")
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
