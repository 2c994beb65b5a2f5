"""Test accuracy through the HTTP service, float32 against int8: the same export served with ``--precision fp32`` and
``--precision int8``, every image of a real folder posted to ``:classify``, side by side.

    python benchmarks/served_accuracy.py --export EXPORT_DIR --folder TEST_FOLDER [--concurrency 8]

``TEST_FOLDER`` holds one sub-folder per class, named like the export's classes (images the run never trained on:
its test split, or a held-out folder). Each server runs in its own process on loopback, one after the other; each
image is sent as its file's bytes (decoded by the server, as a client would send it). Prints per precision the
accuracy with its 95 % Wilson interval, the images whose answers differ between the two, and the exact McNemar test
of a loss on the images one gets right and the other wrong (export.verify.mcnemar, as verification judges), and
requests per second (indicative only: the machine is shared with the client). Exits 1 on any 5xx or unanswered
request.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.contract import ExportDir  # noqa: E402
from export.verify import mcnemar  # noqa: E402
from transfer.compare.stats import wilson_interval  # noqa: E402

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
               ".gif": "image/gif"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _images(folder: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    found = []
    for index, name in enumerate(classes):
        sub = folder / name
        if sub.is_dir():
            found += [(p, index) for p in sorted(sub.iterdir()) if p.suffix.lower() in IMAGE_TYPES]
    extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        sys.exit(f"{folder}: sub-folders {extra} are not classes of the export ({', '.join(classes)})")
    if not found:
        sys.exit(f"{folder}: no images in sub-folders named like the export's classes ({', '.join(classes)})")
    return found


def serve_and_classify(export: ExportDir, precision: str, images: list[tuple[Path, int]], concurrency: int):
    """Start ``transfer serve`` at ``precision``, post every image; returns (predicted class indices, req/s)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "serve", str(export.path), "--host", "127.0.0.1", "--port",
                               str(port), "--precision", precision, "--log-level", "warning"], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/readyz", timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the {precision} server did not start")
                time.sleep(0.3)
        index = {name: i for i, name in enumerate(export.classes)}

        def classify(item: tuple[Path, int]) -> int:
            path, _ = item
            request = urllib.request.Request(f"{base}/v1/models/{export.name}:classify?top_k=1",
                                             data=path.read_bytes(),
                                             headers={"Content-Type": IMAGE_TYPES[path.suffix.lower()]})
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    return index[json.loads(answer.read())["predictions"][0][0]["label"]]
            except urllib.error.HTTPError as exc:
                sys.exit(f"{path}: HTTP {exc.code} from the {precision} server: {exc.read()[:300]!r}")

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            predicted = list(pool.map(classify, images))
        return predicted, len(images) / (time.perf_counter() - started)
    finally:
        server.send_signal(signal.SIGINT)  # a graceful stop, as Ctrl-C
        server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, type=Path, help="export directory with model.onnx and "
                        "model_int8.onnx (transfer export RUN_DIR --formats onnx,onnx_int8)")
    parser.add_argument("--folder", required=True, type=Path, help="real images, one sub-folder per class")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    export = ExportDir.open(args.export)
    images = _images(args.folder, tuple(export.classes))
    truth = [label for _, label in images]
    results = {}
    for precision in ("fp32", "int8"):
        results[precision] = serve_and_classify(export, precision, images, args.concurrency)
    fp32, int8 = results["fp32"][0], results["int8"][0]
    n = len(images)
    print(f"export {export.path} ({export.name}, {len(export.classes)} classes); {n} images of {args.folder}, "
          f"each posted to :classify by {args.concurrency} client threads")
    print("| precision | correct | accuracy | 95% interval | req/s |")
    print("|---|---|---|---|---|")
    for precision, (predicted, rate) in results.items():
        correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
        low, high = wilson_interval(correct, n)
        print(f"| {precision} | {correct} / {n} | {100 * correct / n:.2f}% | {100 * low:.1f}–{100 * high:.1f}% | "
              f"{rate:.0f} |")
    test = mcnemar([p == t for p, t in zip(fp32, truth, strict=True)],
                   [p == t for p, t in zip(int8, truth, strict=True)])
    differ = sum(a != b for a, b in zip(fp32, int8, strict=True))
    delta = 100 * (test["gained"] - test["lost"]) / n
    print(f"\nanswers that differ: {differ} of {n}; right in fp32 only (lost by int8): {test['lost']}, in int8 only "
          f"(gained): {test['gained']}; accuracy int8 - fp32 = {delta:+.2f} points; "
          f"one-sided exact McNemar p of a loss = {test['p_value']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
