"""`transfer serve` and `transfer predict` (also `python -m serve`); TensorFlow is never imported here."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import math
import os
import re
import socket
import sys
import tempfile

from serve.settings import ENV_VAR, MB, Settings
from transfer.errors import UserError

API_KEY_ENV = "TRANSFER_SERVE_API_KEY"
# Settings fields in bytes that the command line takes in MB: (field, flag)
MB_FLAGS = (("max_body_bytes", "max-body-mb"), ("max_json_bytes", "max-json-mb"),
            ("decode_memory_bytes", "decode-memory-mb"), ("buffered_bytes", "buffered-mb"))


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of `transfer serve` / `python -m serve`, built from the Settings fields (their one home)."""
    from dataclasses import fields

    from transfer.options import add_config_args

    p.add_argument("export_dirs", nargs="*", metavar="EXPORT_DIR", help="export directories written by transfer export")
    add_config_args(p, Settings)
    by_name = {f.name: f for f in fields(Settings)}
    for name, flag in MB_FLAGS:
        default = by_name[name].default / MB
        p.add_argument(f"--{flag}", type=float, default=default,
                       help=f"{by_name[name].metadata['help']}, in MB (default: {default:g})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default: info)")


def settings_from_args(args) -> Settings:
    """Settings from parsed `serve` flags (the API key may come from the environment instead)."""
    from transfer.options import build, given

    values = {**given(args, Settings), "export_dirs": tuple(args.export_dirs),
              "api_key": args.api_key or os.environ.get(API_KEY_ENV) or None}
    for name, flag in MB_FLAGS:
        mb = getattr(args, flag.replace("-", "_"))
        if not (math.isfinite(mb) and mb * MB >= 1):
            raise UserError(f"--{flag} {mb:g} must be a positive number of MB")
        values[name] = int(mb * MB)
    return build(Settings, values, "the serve options")


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it), or a one-line UserError: checked before any model is
    loaded, so a busy port or a bad address fails at once."""
    if re.fullmatch(r"[\d.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as exc:
            raise UserError(f"--host {host} is not a valid IPv4 address; use e.g. 127.0.0.1 or 0.0.0.0") from exc
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"--host {host} is not an address or a name this machine can resolve "
                        f"({getattr(exc, 'strerror', None) or exc}); use e.g. 127.0.0.1 or 0.0.0.0") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use; stop what listens there or pick another "
                            "--port") from exc
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host} is not an address of this machine; use 127.0.0.1, 0.0.0.0 or one of "
                            "its addresses") from exc
        if exc.errno == errno.EACCES:
            raise UserError(f"listening on port {port} needs privileges here; use a port above 1023") from exc
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)  # --workers N processes share it
    return sock


def is_loopback(sock: socket.socket) -> bool:
    """Whether ``sock`` is bound to a loopback address only."""
    try:
        return ipaddress.ip_address(sock.getsockname()[0]).is_loopback
    except ValueError:
        return False


def uvicorn_options(settings: Settings, log_level: str = "info", http: str = "auto") -> dict:
    """uvicorn.Config arguments of the server: the guarded protocol (serve/protocol.py: head deadline and size,
    connection cap, JSON errors) and the keep-alive timeout. uvicorn's own ``limit_concurrency`` stays off: it counts
    idle connections too and answers in plain text; serve.middleware caps requests in progress instead."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    from serve.protocol import protocol_class

    log_config = copy.deepcopy(LOGGING_CONFIG)  # uvicorn's, plus the server's own "serve" logger at the same level
    log_config["loggers"]["serve"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    return {"http": protocol_class(http), "timeout_keep_alive": settings.keep_alive_s,
            "h11_max_incomplete_event_size": settings.max_header_bytes, "log_level": log_level,
            "log_config": log_config}


def run_server(settings: Settings, log_level: str = "info") -> None:
    """Check the exports and the address, then serve with uvicorn until interrupted.

    Everything that can be refused with one line is checked before uvicorn starts or a model is loaded: the export
    directories, the ONNX files' sha256, and that the address can be bound (the bound socket is handed to uvicorn).
    """
    import uvicorn

    from serve.model import check_servable
    from serve.repo import discover

    exports = [export for _, export in discover(settings.export_dirs, settings.model_repo)]
    for export in exports:
        check_servable(export, settings.precision)
    sock = bind_socket(settings.host, settings.port)
    from serve.engine import tune_switch_interval
    from serve.limits import tune_malloc

    tune_switch_interval()
    tune_malloc()
    port = sock.getsockname()[1]
    if settings.api_key is None and not is_loopback(sock):
        print(f"serve: warning: {settings.host} is reachable from other machines and no --api-key is set: anyone "
              f"who can reach port {port} can use the API", file=sys.stderr, flush=True)
    print(f"serving {', '.join(dict.fromkeys(e.name for e in exports))} on http://{settings.host}:{port} "
          f"(docs at /docs, metrics at /metrics)", file=sys.stderr, flush=True)
    common = uvicorn_options(settings, log_level)
    try:
        if settings.workers == 1:
            from serve.app import create_app

            app = create_app(settings)
            app.state.serve.bulk.start()
            try:
                uvicorn.Server(uvicorn.Config(app, **common)).run(sockets=[sock])
            finally:
                app.state.serve.bulk.stop()
            return
        from uvicorn.supervisors import Multiprocess

        os.environ[ENV_VAR] = settings.to_env()
        with tempfile.TemporaryDirectory(prefix="serve-metrics-") as metrics_dir:
            # Worker processes share their counters through files, so /metrics reports the whole server.
            os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
            config = uvicorn.Config("serve.app:app_from_env", factory=True, workers=settings.workers, **common)
            Multiprocess(config, sockets=[sock]).run()
    except KeyboardInterrupt:  # uvicorn re-raises the signal it stopped on
        pass
    finally:
        sock.close()


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
