"""`transfer serve` and `transfer predict` (also `python -m serve`); TensorFlow is never imported here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from serve.settings import ENV_VAR, Settings
from transfer.errors import UserError

API_KEY_ENV = "TRANSFER_SERVE_API_KEY"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of `transfer serve` / `python -m serve`."""
    p.add_argument("export_dirs", nargs="*", metavar="EXPORT_DIR", help="export directories written by transfer export")
    p.add_argument("--model-repo", metavar="DIR", help="serve every export directory under DIR, each by folder name")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1, help="server processes (each loads every model)")
    p.add_argument("--max-batch", type=int, default=32, help="largest inference batch (default 32)")
    p.add_argument("--batch-timeout-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests on their way (default 5)")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads per inference stream (default 0 = auto)")
    p.add_argument("--streams", type=int, default=0,
                   help="batches of one model run at the same time (default 0 = auto: one 1-thread stream per core)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 (or set {API_KEY_ENV})")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body (default 16 MB)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image, in pixels (default 40M)")
    p.add_argument("--max-images", type=int, default=64, help="most images per request (default 64)")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request (default 30)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def settings_from_args(args) -> Settings:
    """Settings from parsed `serve` flags."""
    return Settings(
        export_dirs=tuple(args.export_dirs), model_repo=args.model_repo, host=args.host, port=args.port,
        workers=args.workers, max_batch=args.max_batch, batch_timeout_ms=args.batch_timeout_ms, threads=args.threads,
        streams=args.streams,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, max_body_bytes=int(args.max_body_mb * 2**20),
        max_pixels=args.max_pixels, max_images=args.max_images, request_timeout_s=args.request_timeout,
    )


def run_server(settings: Settings, log_level: str = "info") -> None:
    """Check the exports, then serve with uvicorn until interrupted."""
    import uvicorn

    from serve.model import discover

    exports = discover(settings.export_dirs, settings.model_repo)  # fail with one line before uvicorn starts
    from serve.engine import tune_switch_interval

    tune_switch_interval()
    print(f"serving {', '.join(e.name for e in exports)} on http://{settings.host}:{settings.port} "
          f"(docs at /docs, metrics at /metrics)", file=sys.stderr, flush=True)
    if settings.workers == 1:
        from serve.app import create_app

        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level)
        return
    os.environ[ENV_VAR] = settings.to_env()
    with tempfile.TemporaryDirectory(prefix="serve-metrics-") as metrics_dir:
        # Worker processes share their counters through files, so /metrics reports the whole server.
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
        uvicorn.run("serve.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level=log_level)


def cmd_serve(args) -> int:
    run_server(settings_from_args(args), args.log_level)
    return 0


def cmd_predict(args) -> int:
    from serve.predict import predict_files

    if args.top_k < 1:
        raise UserError(f"--top-k={args.top_k} must be >= 1")
    export, probabilities = predict_files(args.export_dir, args.images, args.format)
    k = min(args.top_k, len(export.classes))
    rows = []
    for path, row in zip(args.images, probabilities, strict=True):
        top = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        rows.append({"file": path, "top_k": [{"label": export.classes[j], "index": j, "score": float(row[j])}
                                            for j in top],
                     "probabilities": [float(p) for p in row]})
    if args.json:
        print(json.dumps({"model": export.name, "format": args.format, "predictions": rows}, indent=2))
    else:
        for r in rows:
            print(f"{r['file']}: " + ", ".join(f"{t['label']} {t['score']:.4f}" for t in r["top_k"]))
    return 0


def register(subparsers) -> None:
    """Add `serve` and `predict` to the `transfer` command."""
    p = subparsers.add_parser("serve", help="serve exported models over HTTP with ONNX Runtime")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    from export.formats import FORMATS

    p = subparsers.add_parser("predict", help="classify image files with an exported model, without a server")
    p.add_argument("export_dir", metavar="EXPORT_DIR")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--format", default="onnx",
                   help=f"which of the export's formats to run: {' | '.join(FORMATS)} (default onnx; only "
                   "savedmodel needs TensorFlow)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON with the full probability vectors")
    p.set_defaults(func=cmd_predict)


def main(argv: list[str] | None = None) -> int:
    """`python -m serve EXPORT_DIR ...`: the server without the `transfer` command (and without TensorFlow)."""
    parser = argparse.ArgumentParser(prog="python -m serve", description="Serve exported models over HTTP.")
    add_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except UserError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
