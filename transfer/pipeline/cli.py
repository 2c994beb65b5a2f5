"""``transfer pipeline CONFIG``: compare a matrix, export and verify every winner, benchmark the exports, one report.

Every step is resumable: ``compare`` skips complete cells, an export whose manifest matches its source run and whose
verification passed is kept, and a ``bench.json`` newer than its export's manifest is kept. The pipeline reads its
config with compare's reader (two more tables: [export] and [bench]) and calls compare with the resolved settings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from transfer import rundir
from transfer.errors import UserError
from transfer.options import Table

PIPELINE_HTML, PIPELINE_JSON = "pipeline.html", "pipeline.json"


def _tables() -> tuple[Table, ...]:
    from transfer.config import BenchConfig, ExportStepConfig

    return Table("export", ExportStepConfig), Table("bench", BenchConfig)


def register(subparsers) -> None:
    """Add the ``pipeline`` sub-command."""
    from dataclasses import fields

    from transfer.config import CompareConfig, RunConfig
    from transfer.options import add_config_args

    p = subparsers.add_parser(
        "pipeline", help="compare a matrix, export + verify + bench every winner, one end-to-end report",
        description="CONFIG is a compare TOML (see configs/) with optional [export] (formats, quantize, "
        "calibration_samples) and [bench] (threads, iterations, warmup) tables. Resumable: finished cells, exports "
        "and benchmarks are not redone. Exit 1 when a winner's export, verification or benchmark failed.",
    )
    p.add_argument("config", metavar="CONFIG", help="compare TOML file, e.g. configs/quickstart.toml")
    p.add_argument("--artifacts", help="artifacts root (default: the config's, else artifacts)")
    p.add_argument("--name", help="report name: <artifacts>/reports/<name>/ (default: the config's name)")
    p.add_argument("--formats", help="export formats, overriding [export] formats (default: all)")
    p.add_argument("--quantize", help="quantized variants (fp16, dynamic, int8), overriding [export] quantize")
    p.add_argument("--serve", action="store_true", help="afterwards, serve the best model's export (Ctrl-C stops)")
    p.add_argument("--port", type=int, help="port for --serve (default: serve's)")
    add_config_args(p, RunConfig, exclude=("artifacts", "name", "overwrite"))
    add_config_args(p, CompareConfig, exclude=tuple(f.name for f in fields(CompareConfig) if f.name != "rank_by"),
                    unset=True, default_texts={"rank_by": "the config's, else accuracy"})
    p.set_defaults(func=cmd_pipeline)


def resolve(args) -> tuple:
    """(compare settings, export settings, bench settings) from CONFIG and the flags, validated before any work."""
    from transfer.compare.matrix import load_config, resolve_settings
    from transfer.config import BenchConfig, ExportStepConfig
    from transfer.options import build
    from transfer.pipeline.steps import export_settings

    config = load_config(args.config, _tables())
    flags = argparse.Namespace(artifacts=args.artifacts, name=args.name, strategy=args.strategy,
                               rank_by=args.rank_by)
    settings = resolve_settings(config, flags, config_file=str(args.config))
    exporting = export_settings(build(ExportStepConfig, config["export"], "[export]"), args.formats, args.quantize)
    benching = build(BenchConfig, config["bench"], "[bench]")
    if args.port is not None and not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} must be between 1 and 65535")
    return settings, exporting, benching


def _shown(path: str | Path) -> str:
    """A path relative to the working directory when it is under it (shorter commands), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cmd_pipeline(args) -> int:
    import dataclasses

    from transfer.compare.cli import run_compare
    from transfer.pipeline.report import render_html
    from transfer.pipeline.steps import bench_export, export_winner

    settings, exporting, benching = resolve(args)
    print("=== step 1/4: compare ===", flush=True)
    result = run_compare(settings)
    report_dir = result.report_dir
    public_rows = [{k: v for k, v in r.items() if k != "history"} for r in result.rows]
    leaderboard = {"name": report_dir.name, "settings": result.settings, "rows": public_rows}

    winners, seen = [], set()
    for w in result.winners:
        if w["best_run"] not in seen:
            seen.add(w["best_run"])
            evaluation = rundir.read_json(Path(w["best_run"]) / rundir.EVALUATION)
            winners.append({**w, "evaluation": {k: evaluation.get(k) for k in
                                                ("split", "accuracy", "top5_accuracy", "loss", "samples")}})

    print(f"\n=== step 2/4: export {len(winners)} winner(s): {', '.join(exporting['wanted'])} ===", flush=True)
    for w in winners:
        print(f"\nexport: winner {w['cell']} ({', '.join(w['why'])})", flush=True)
        w["export"] = export_winner(Path(w["best_run"]), exporting)
    print("\n=== step 3/4: bench ===", flush=True)
    for w in winners:
        if w["export"]["dir"] and (Path(w["export"]["dir"]) / rundir.MANIFEST).is_file():
            w["bench"] = bench_export(Path(w["export"]["dir"]), benching)
        else:
            w["bench"] = {"skipped": False, "error": "no export to benchmark"}

    passed = [w for w in winners if w["export"]["passed"]]
    best = passed[0] if passed else None
    serve_cmd = None
    if best is not None:
        serve_cmd = f"transfer serve {_shown(best['export']['dir'])}" + (
            f" --port {args.port}" if args.port is not None else "")
    failures = [w for w in winners if not w["export"]["passed"] or w["bench"]["error"]]
    data = {
        "name": leaderboard["name"],
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config_file": str(args.config),
        "status": "failed" if failures else "passed",
        "report_dir": str(report_dir),
        "compare_report": str(report_dir / "report.html"),
        "settings": leaderboard["settings"],
        "export_settings": {k: v for k, v in exporting.items() if k not in ("options", "given_options")}
        | {"calibration_samples": exporting["options"].calibration_samples},
        "bench_settings": dataclasses.asdict(benching),
        "leaderboard": leaderboard["rows"],
        "winners": winners,
        "best": None if best is None else {"cell": best["cell"], "run_dir": best["best_run"],
                                           "export_dir": best["export"]["dir"], "serve_command": serve_cmd},
    }
    print("\n=== step 4/4: report ===", flush=True)
    rundir.write_json(report_dir / PIPELINE_JSON, data)
    (report_dir / PIPELINE_HTML).write_text(render_html(data, report_dir))

    print("\n=== pipeline summary ===")
    for w in winners:
        state = "ok" if w["export"]["passed"] and not w["bench"]["error"] else "FAILED"
        detail = w["export"]["error"] or w["bench"]["error"] or ""
        print(f"{state:<7}{w['cell']:<32}{w['evaluation']['accuracy'] * 100:6.2f}%  {_shown(w['export']['dir'] or '-')}"
              + (f"  ({detail})" if detail else ""))
    print(f"report: {report_dir / PIPELINE_HTML} (and {PIPELINE_JSON}, compare report.html)")
    if best is not None:
        print(f"best model: {best['cell']} ({', '.join(best['why'])}), export {_shown(best['export']['dir'])}")
        print(f"serve it:   {serve_cmd}")
    else:
        print("no winner exported and verified; nothing to serve", file=sys.stderr)
    sys.stdout.flush()
    code = 1 if failures else 0
    if args.serve:
        if best is None:
            return 1
        return _serve(best["export"]["dir"], args.port) or code
    return code


def _serve(export_dir: str, port: int | None) -> int:
    from serve.cli import add_serve_args, cmd_serve

    parser = argparse.ArgumentParser(prog="transfer serve")
    add_serve_args(parser)
    return cmd_serve(parser.parse_args([export_dir, *(["--port", str(port)] if port is not None else [])]))


