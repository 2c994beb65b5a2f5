"""Resident memory of a running server after warm-up, and whether TensorFlow got into it.

    python benchmarks/serve_memory.py [--export DIR] [--requests 50]

Starts `transfer serve EXPORT_DIR` and then `python -m serve EXPORT_DIR` as separate processes on loopback, waits
for /readyz, sends --requests classify requests, then reads the server's VmRSS (resident now) and VmHWM (peak
resident) from /proc/PID/status and counts the TensorFlow libraries mapped into it (/proc/PID/maps: a process that
imported tensorflow maps libtensorflow_framework and _pywrap_tensorflow_internal). Linux only (/proc).

Without --export it trains and exports the serve tests' tiny LeNet-5 (tests/serve/serve_fixtures.py, about ten
seconds; TensorFlow is needed for that, in this process only). Prints numbers; it asserts nothing about them.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "serve")]

from serve_load import _free_port  # noqa: E402  (benchmarks/ is on sys.path when a script in it runs)

from serve.client import ServeClient  # noqa: E402


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 40, 3), (220, 40, 40), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def mapped_libraries(pid: int, needle: str) -> list[str]:
    """Distinct files mapped into ``pid`` whose path contains ``needle``."""
    paths = {line.split(maxsplit=5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
             if len(line.split(maxsplit=5)) == 6}
    return sorted(p for p in paths if needle in p.lower())


def measure(label: str, cmd: list[str], model: str, requests: int) -> dict:
    """Start ``cmd`` (which must serve on the port it names), warm it up with classify requests, read /proc."""
    port = int(cmd[cmd.index("--port") + 1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        api, deadline = ServeClient(f"http://127.0.0.1:{port}", timeout=10), time.monotonic() + 120
        while not api.health():
            if server.poll() is not None:
                raise SystemExit(f"{label} exited with {server.returncode}:\n{server.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{label} was not ready within 120 s")
            time.sleep(0.1)
        ready_s = time.perf_counter() - started
        png = _png()
        for _ in range(requests):
            api.classify(model, png, top_k=1)
        status = proc_status(server.pid)
        return {"label": label, "pid": server.pid, "ready_s": ready_s, "rss_mb": status["VmRSS"] / 1024,
                "hwm_mb": status["VmHWM"] / 1024, "tensorflow": mapped_libraries(server.pid, "tensorflow"),
                "onnxruntime": bool(mapped_libraries(server.pid, "onnxruntime"))}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", help="export directory to serve (default: build the serve tests' tiny LeNet-5)")
    parser.add_argument("--requests", type=int, default=50, help="classify requests before reading memory")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serve-memory-") as tmp:
        if args.export:
            export_dir = Path(args.export)
        else:
            from serve_fixtures import build_export

            export_dir = build_export(Path(tmp) / "tiny", formats=("onnx",))
        from export.contract import ExportDir

        model = ExportDir.open(export_dir).name
        transfer = shutil.which("transfer", path=str(Path(sys.executable).parent))
        transfer_cmd = [transfer] if transfer else [sys.executable, "-m", "transfer"]
        common = [str(export_dir), "--host", "127.0.0.1", "--log-level", "warning", "--port"]
        rows = [measure("transfer serve", [*transfer_cmd, "serve", *common, str(_free_port())], model, args.requests),
                measure("python -m serve", [sys.executable, "-m", "serve", *common, str(_free_port())], model,
                        args.requests)]

    print(f"\nmodel {model} ({export_dir}), {args.requests} classify requests each, then /proc/PID/status:\n")
    print("| command | ready after s | VmRSS MB | VmHWM MB | TensorFlow libraries mapped | onnxruntime mapped |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['label']}` | {r['ready_s']:.1f} | {r['rss_mb']:.0f} | {r['hwm_mb']:.0f} | "
              f"{len(r['tensorflow'])} | {'yes' if r['onnxruntime'] else 'no'} |")
    for r in rows:
        for path in r["tensorflow"]:
            print(f"{r['label']}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
