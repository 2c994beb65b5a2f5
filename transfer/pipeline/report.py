"""The pipeline's self-contained end-to-end report (plots embedded; runs, compare report and exports linked)."""

from __future__ import annotations

import html
from pathlib import Path

from transfer.render import html_figures, html_link, html_page, html_table


def _pct(value) -> str:
    return "—" if value is None else f"{value * 100:.2f}%"


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


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
    from transfer.compare.report import COLUMNS, PLOTS, _cell_text

    esc = html.escape
    board = html_table([h for _, h in COLUMNS] + ["run"],
                   [[esc(_cell_text(r, k)) for k, _ in COLUMNS] + [html_link(r["best_run"], report_dir, "run dir")]
                    for r in data["leaderboard"]])
    wins = html_table(["cell", "why", "test acc (evaluation.json)", "run", "export", "status"],
                  [[f"<b>{esc(w['cell'])}</b>", esc(", ".join(w["why"])), _pct(w["evaluation"]["accuracy"]),
                    html_link(w["best_run"], report_dir, Path(w["best_run"]).name),
                    (html_link(w["export"]["dir"], report_dir, Path(w["export"]["dir"]).name)
                     if w["export"]["dir"] else "—"),
                    '<b class="ok">ok</b>' if w["export"]["passed"] and not w["bench"]["error"] else
                    '<b class="bad">FAILED</b> ' + esc(w["export"]["error"] or w["bench"]["error"] or "")]
                   for w in data["winners"]])
    sections = []
    for w in data["winners"]:
        e, b = w["export"], w["bench"]
        part = [f"<h3>{esc(w['cell'])} — " + (html_link(e["dir"], report_dir, e["dir"]) if e["dir"] else "no export")
                + (" (kept from a previous run)" if e["skipped"] else "") + "</h3>"]
        if e["error"]:
            part.append(f'<p class="bad">export/verification failed: {esc(e["error"])}</p>')
        if e.get("verify"):
            part.append("<h4>Verification against the Keras model (test split)</h4>" + html_table(
                ["format", "max |diff|", "mean |diff|", "top-1 agreement", "accuracy", "result"],
                _verify_rows(e["verify"])))
        if b.get("formats"):
            part.append("<h4>Benchmark</h4>" + html_table(
                ["format", "size MB", "p50 ms (b=1)", "p50 ms (b=32)", "img/s (b=1)", "img/s (b=32)"],
                _bench_rows(b["formats"])))
        elif b["error"]:
            part.append(f'<p class="bad">benchmark failed: {esc(b["error"])}</p>')
        sections.append("".join(part))
    images = html_figures(report_dir / "plots" / name for name in PLOTS)
    best = data["best"]
    serve = '<p class="bad">No winner was exported and verified.</p>'
    if best:
        serve = (f"<p>Best model: <b>{esc(best['cell'])}</b>, export "
                 f"{html_link(best['export_dir'], report_dir, best['export_dir'])}. "
                 f"Serve it with <code>{esc(best['serve_command'])}</code></p>")
    s = data["settings"]
    return html_page(f"Pipeline: {data['name']}", f"""<h1>Pipeline: {esc(data['name'])} — {esc(data['status'])}</h1>
<p>Config <code>{esc(data['config_file'])}</code>; dataset <code>{esc(s['dataset'])}</code> (fingerprint
<code>{esc(s['fingerprint'][:12])}</code>), seeds {s['seeds']}, epochs {s['train']['epochs']}.
Compare report: {html_link(data['compare_report'], report_dir, 'report.html')}. Created {esc(data['created'])}.</p>
{serve}
<h2>Leaderboard</h2>{board}
<h2>Winners and why</h2>{wins}
<h2>Exports: verification and benchmarks</h2>{''.join(sections)}
<h2>Plots</h2>{images}""")
