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
    """The flags of `transfer serve` / `python -m serve`, built from the Settings fields (their one home)."""
    from dataclasses import fields

    from transfer.options import add_config_args

    p.add_argument("export_dirs", nargs="*", metavar="EXPORT_DIR", help="export directories written by transfer export")
    add_config_args(p, Settings)
    body = next(f.default for f in fields(Settings) if f.name == "max_body_bytes") / 2**20
    p.add_argument("--max-body-mb", type=float, default=body, help=f"largest request body in MB (default: {body:g})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default: info)")


def settings_from_args(args) -> Settings:
    """Settings from parsed `serve` flags (the API key may come from the environment instead)."""
    from transfer.options import build, given

    values = {**given(args, Settings), "export_dirs": tuple(args.export_dirs),
              "api_key": args.api_key or os.environ.get(API_KEY_ENV) or None,
              "max_body_bytes": int(args.max_body_mb * 2**20)}
    return build(Settings, values, "the serve options")


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
