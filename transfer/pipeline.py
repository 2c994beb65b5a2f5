"""``transfer pipeline CONFIG``: compare a matrix, export and verify every winner, benchmark the exports, one report.

Every step is resumable: ``compare`` skips complete cells, an export whose manifest matches its source run and whose
verification passed is kept, and a ``bench.json`` newer than its export's manifest is kept.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import json
import os
import sys
import tempfile
from pathlib import Path

from transfer import rundir
from transfer.distribute import STRATEGIES
from transfer.errors import UserError

# Tables the pipeline adds to a compare config; everything else is the compare config itself.
EXTRA_SCHEMA: dict[str, dict[str, tuple]] = {
    "export": {"formats": (str, list), "quantize": (str, list), "calibration_samples": (int,)},
    "bench": {"threads": (int,), "iterations": (int,), "warmup": (int,)},
}
PIPELINE_HTML, PIPELINE_JSON = "pipeline.html", "pipeline.json"


def register(subparsers) -> None:
    """Add the ``pipeline`` sub-command."""
    p = subparsers.add_parser(
        "pipeline", help="compare a matrix, export + verify + bench every winner, one end-to-end report",
        description="CONFIG is a compare TOML (see configs/) with optional [export] (formats, quantize, "
        "calibration_samples) and [bench] (threads, iterations, warmup) tables. Resumable: finished cells, exports "
        "and benchmarks are not redone. Exit 1 when a winner's export, verification or benchmark failed.",
    )
    p.add_argument("config", metavar="CONFIG", help="compare TOML file, e.g. configs/pipeline-smoke.toml")
    p.add_argument("--artifacts", help="artifacts root (default: the config's, else artifacts)")
    p.add_argument("--name", help="report name: <artifacts>/reports/<name>/ (default: the config's name)")
    p.add_argument("--formats", help="export formats, overriding [export] formats (default: all)")
    p.add_argument("--quantize", help="tflite variants, overriding [export] quantize")
    p.add_argument("--serve", action="store_true", help="afterwards, serve the best model's export (Ctrl-C stops)")
    p.add_argument("--port", type=int, help="port for --serve (default 8080)")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="tf.distribute strategy for training: auto | one-device | mirrored | multi-worker")
    p.set_defaults(func=cmd_pipeline)


# ---------------------------------------------------------------------------------------------- config


def _toml_value(key: str, value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(key, v) for v in value) + "]"
    raise UserError(f"config key '{key}' = {value!r} has a type the pipeline does not accept")


def _toml_table(table: dict, prefix: str) -> list[str]:
    return [f"{k} = {_toml_value(prefix + k, v)}" for k, v in table.items()]


def dump_compare_toml(config: dict) -> str:
    """The compare part of a pipeline config as TOML text (scalars, lists, tables and arrays of tables)."""
    lines = _toml_table({k: v for k, v in config.items() if not isinstance(v, dict | list) or
                         (isinstance(v, list) and not any(isinstance(x, dict) for x in v))}, "")
    for key, value in config.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]", *_toml_table(value, f"{key}.")]
        elif isinstance(value, list) and any(isinstance(x, dict) for x in value):
            for i, table in enumerate(value):
                if not isinstance(table, dict):
                    raise UserError(f"config '{key}' must be [[{key}]] tables, got {table!r}")
                lines += ["", f"[[{key}]]", *_toml_table(table, f"{key}[{i}].")]
    return "\n".join(lines) + "\n"


def split_config(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(compare config, [export] table, [bench] table) of a pipeline TOML; mistakes are one-line UserErrors."""
    import tomllib

    from transfer.compare import _check_keys

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist; pass a TOML file such as configs/pipeline-smoke.toml")
    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file '{path}' is not valid TOML: {exc}") from exc
    extra = {}
    for section, schema in EXTRA_SCHEMA.items():
        table = config.pop(section, {})
        if not isinstance(table, dict):
            raise UserError(f"config '{section}' must be a [{section}] table")
        _check_keys(table, schema, f"{section}.")
        extra[section] = table
    return config, extra["export"], extra["bench"]


def _joined(value) -> str | None:
    if value is None:
        return None
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def export_settings(table: dict, formats: str | None, quantize: str | None) -> dict:
    """ExportConfig keyword arguments from [export] and the flags (flags win); validated up front."""
    from export.formats import QUANTIZE_CHOICES, ExportOptions, check_options, select_formats

    formats = formats if formats is not None else _joined(table.get("formats"))
    quantize = quantize if quantize is not None else _joined(table.get("quantize"))
    formats = None if formats in ("all", "") else formats
    quantize = ",".join(QUANTIZE_CHOICES) if quantize == "all" else quantize
    rows = select_formats(formats, quantize)
    given = {"calibration_samples": "[export] calibration_samples"} if "calibration_samples" in table else {}
    check_options(rows, given)
    samples = table.get("calibration_samples", 200)
    if samples <= 0:
        raise UserError(f"[export] calibration_samples = {samples} must be > 0")
    return {"formats": formats, "quantize": quantize, "options": ExportOptions(calibration_samples=samples),
            "given_options": given, "wanted": [r.name for r in rows]}


def bench_settings(table: dict) -> dict:
    out = {"threads": table.get("threads", 1), "iterations": table.get("iterations", 50),
           "warmup": table.get("warmup", 5)}
    if out["threads"] <= 0 or out["iterations"] <= 0 or out["warmup"] < 0:
        raise UserError(f"[bench] threads and iterations must be > 0 and warmup >= 0, got {out}")
    return out


# ---------------------------------------------------------------------------------------------- steps


def run_compare(compare_toml: Path, name: str | None, artifacts: str | None,
                strategy: str = "auto") -> tuple[argparse.Namespace, dict]:
    """Parse compare's own flags for the stripped config, validate everything, return (args, resolved top level)."""
    from transfer import compare

    parser = argparse.ArgumentParser(prog="transfer")
    compare.register(parser.add_subparsers(dest="command"))
    argv = ["compare", "--config", str(compare_toml)]
    argv += ["--name", name] if name else []
    argv += ["--artifacts", artifacts] if artifacts else []
    args = parser.parse_args([*argv, "--strategy", strategy])
    _, _, top = compare.resolve_settings(args)  # a bad matrix fails here, before anything trains
    return args, top


def export_is_current(out: Path, run_dir: Path, run_manifest: dict, wanted: list[str]) -> bool:
    """The export dir was made from this very run (path and whole manifest) and every wanted format verified."""
    from export.exporter import VERIFY

    if not (out / rundir.MANIFEST).is_file() or not (out / VERIFY).is_file():
        return False
    manifest = rundir.read_json(out / rundir.MANIFEST)
    export = manifest.get("export") or {}
    if Path(export.get("source_run", "")) != run_dir.resolve():
        return False
    if {k: v for k, v in manifest.items() if k != "export"} != run_manifest:
        return False
    verified = rundir.read_json(out / VERIFY).get("formats", {})
    return all(export.get("formats", {}).get(n, {}).get("status") == "verified" and verified.get(n, {}).get("passed")
               for n in wanted)


def export_winner(run_dir: Path, settings: dict) -> dict:
    """Export + verify one winner (or keep a current export); never raises: errors are recorded."""
    from export.exporter import VERIFY, ExportConfig, default_out, run_export

    entry: dict = {"dir": None, "skipped": False, "error": None}
    try:
        run_manifest = rundir.load_complete(run_dir)
        out = default_out(run_dir, run_manifest["name"])
        entry["dir"] = str(out)
        if export_is_current(out, run_dir, run_manifest, settings["wanted"]):
            entry["skipped"] = True
            print(f"export: {out} is current (same run, verified); kept", flush=True)
        else:
            run_export(ExportConfig(run_dir=str(run_dir), formats=settings["formats"], quantize=settings["quantize"],
                                    options=settings["options"], given_options=settings["given_options"]))
        verify = rundir.read_json(out / VERIFY)["formats"] if (out / VERIFY).is_file() else {}
        entry["verify"] = {n: verify[n] for n in settings["wanted"] if n in verify}
        missing = [n for n in settings["wanted"] if n not in verify]
        failed = [n for n, r in entry["verify"].items() if not r.get("passed")]
        if missing or failed:
            entry["error"] = "; ".join([f"{n}: not verified" for n in missing] +
                                       [f"{n}: {', '.join(entry['verify'][n].get('failures') or ['failed'])}"
                                        for n in failed])
    except Exception as exc:  # one winner failing must not stop the others
        entry["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    entry["passed"] = entry["error"] is None
    return entry


def bench_export(out: Path, settings: dict) -> dict:
    """Benchmark an export dir unless its bench.json is newer than its manifest; never raises."""
    from export.bench import BENCH, bench

    entry: dict = {"skipped": False, "error": None}
    try:
        path, manifest = out / BENCH, out / rundir.MANIFEST
        if path.is_file() and path.stat().st_mtime > manifest.stat().st_mtime:
            entry["skipped"] = True
            print(f"bench: {path} is newer than the export; kept", flush=True)
        else:
            bench(out, **settings)
        entry["formats"] = rundir.read_json(path)["formats"]
    except Exception as exc:
        entry["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return entry


# ---------------------------------------------------------------------------------------------- the command


def _shown(path: str | Path) -> str:
    """A path relative to the working directory when it is under it (shorter commands), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cmd_pipeline(args) -> int:
    from transfer.compare import cmd_compare

    compare_cfg, export_table, bench_table = split_config(args.config)
    exporting = export_settings(export_table, args.formats, args.quantize)
    benching = bench_settings(bench_table)
    if args.port is not None and not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} must be between 1 and 65535")

    with tempfile.TemporaryDirectory(prefix="pipeline-") as tmp:
        compare_toml = Path(tmp) / Path(args.config).name
        compare_toml.write_text(dump_compare_toml(compare_cfg))
        compare_args, top = run_compare(compare_toml, args.name, args.artifacts, args.strategy)
        print("=== step 1/4: compare ===", flush=True)
        cmd_compare(compare_args)
    report_dir = Path(top["artifacts"]) / "reports" / rundir.slug(top["name"])
    leaderboard = rundir.read_json(report_dir / "leaderboard.json")
    leaderboard["settings"]["config_file"] = str(args.config)  # not the temporary compare-only copy
    rundir.write_json(report_dir / "leaderboard.json", leaderboard)

    winners, seen = [], set()
    for w in rundir.read_json(report_dir / "winners.json")["winners"]:
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
        "bench_settings": benching,
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


# ---------------------------------------------------------------------------------------------- the report


def _pct(value) -> str:
    return "—" if value is None else f"{value * 100:.2f}%"


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _link(target: str | Path, report_dir: Path, text: str) -> str:
    href = os.path.relpath(Path(target).resolve(), report_dir.resolve())
    return f'<a href="{html.escape(href)}">{html.escape(text)}</a>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are already escaped HTML."""
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def _verify_rows(verify: dict) -> list[list[str]]:
    rows = []
    for name, r in verify.items():
        ok = '<b class="ok">pass</b>' if r.get("passed") else (
            '<b class="bad">FAIL</b> ' + html.escape("; ".join(r.get("failures") or [])))
        rows.append([html.escape(name), _num(r.get("max_abs_diff"), ".2e"), _num(r.get("mean_abs_diff"), ".2e"),
                     _pct(r.get("top1_agreement")), _pct(r.get("accuracy")), ok])
    return rows


def _bench_rows(formats: dict) -> list[list[str]]:
    rows = []
    for name, r in formats.items():
        b1, b32 = r.get("batch1") or {}, r.get("batch32") or {}
        size = None if r.get("size_bytes") is None else r["size_bytes"] / 1e6
        rows.append([html.escape(name), _num(size, ".2f"), _num(b1.get("p50_ms"), ".2f"),
                     _num(b32.get("p50_ms"), ".2f"), _num(b1.get("throughput_ips"), ",.0f"),
                     _num(b32.get("throughput_ips"), ",.0f")])
    return rows


def render_html(data: dict, report_dir: Path) -> str:
    """The self-contained end-to-end report (plots embedded; runs, compare report and exports linked)."""
    from transfer.compare import COLUMNS, PLOTS, _cell_text

    esc = html.escape
    board = _table([h for _, h in COLUMNS] + ["run"],
                   [[esc(_cell_text(r, k)) for k, _ in COLUMNS] + [_link(r["best_run"], report_dir, "run dir")]
                    for r in data["leaderboard"]])
    wins = _table(["cell", "why", "test acc (evaluation.json)", "run", "export", "status"],
                  [[f"<b>{esc(w['cell'])}</b>", esc(", ".join(w["why"])), _pct(w["evaluation"]["accuracy"]),
                    _link(w["best_run"], report_dir, Path(w["best_run"]).name),
                    _link(w["export"]["dir"], report_dir, Path(w["export"]["dir"]).name) if w["export"]["dir"] else "—",
                    '<b class="ok">ok</b>' if w["export"]["passed"] and not w["bench"]["error"] else
                    '<b class="bad">FAILED</b> ' + esc(w["export"]["error"] or w["bench"]["error"] or "")]
                   for w in data["winners"]])
    sections = []
    for w in data["winners"]:
        e, b = w["export"], w["bench"]
        part = [f"<h3>{esc(w['cell'])} — " + (_link(e["dir"], report_dir, e["dir"]) if e["dir"] else "no export")
                + (" (kept from a previous run)" if e["skipped"] else "") + "</h3>"]
        if e["error"]:
            part.append(f'<p class="bad">export/verification failed: {esc(e["error"])}</p>')
        if e.get("verify"):
            part.append("<h4>Verification against the Keras model (test split)</h4>" + _table(
                ["format", "max |diff|", "mean |diff|", "top-1 agreement", "accuracy", "result"],
                _verify_rows(e["verify"])))
        if b.get("formats"):
            part.append("<h4>Benchmark</h4>" + _table(
                ["format", "size MB", "p50 ms (b=1)", "p50 ms (b=32)", "img/s (b=1)", "img/s (b=32)"],
                _bench_rows(b["formats"])))
        elif b["error"]:
            part.append(f'<p class="bad">benchmark failed: {esc(b["error"])}</p>')
        sections.append("".join(part))
    images = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{esc(p.stem.replace('_', ' '))}</figcaption></figure>"
        for p in (report_dir / "plots" / name for name in PLOTS) if p.is_file())
    best = data["best"]
    serve = '<p class="bad">No winner was exported and verified.</p>'
    if best:
        serve = (f"<p>Best model: <b>{esc(best['cell'])}</b>, export "
                 f"{_link(best['export_dir'], report_dir, best['export_dir'])}. "
                 f"Serve it with <code>{esc(best['serve_command'])}</code></p>")
    s = data["settings"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Pipeline: {esc(data['name'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#eee}}.ok{{color:#080}}
.bad{{color:#b00}}figure{{display:inline-block;margin:1em}}img{{max-width:560px}}</style></head><body>
<h1>Pipeline: {esc(data['name'])} — {esc(data['status'])}</h1>
<p>Config <code>{esc(data['config_file'])}</code>; dataset <code>{esc(s['dataset'])}</code> (fingerprint
<code>{esc(s['fingerprint'][:12])}</code>), seeds {s['seeds']}, epochs {s['train']['epochs']}.
Compare report: {_link(data['compare_report'], report_dir, 'report.html')}. Created {esc(data['created'])}.</p>
{serve}
<h2>Leaderboard</h2>{board}
<h2>Winners and why</h2>{wins}
<h2>Exports: verification and benchmarks</h2>{''.join(sections)}
<h2>Plots</h2>{images}
</body></html>
"""
