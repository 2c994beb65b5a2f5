"""Rendering shared by the commands and reports: terminal tables and the pieces of the self-contained HTML pages."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

PAGE_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;margin:.5em 0}"
              "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}.ok{color:#080}"
              ".bad{color:#b00}figure{display:inline-block;margin:1em}img{max-width:560px}")


def print_rows(rows: list[dict], columns: list[tuple[str, str, str]], *, as_json: bool = False,
               json_keys: list[str] | None = None) -> None:
    """Print ``rows`` as JSON or as a fixed-width table; ``columns`` = (key, header, format spec)."""
    import json

    if as_json:
        print(json.dumps([{k: r[k] for k in (json_keys or r)} for r in rows], indent=2))
        return
    header = "  ".join(f"{title:{spec.rstrip(',')}}" for _, title, spec in columns)
    print(header)
    print("-" * len(header))
    for r in rows:
        print("  ".join(f"{r[key] if r[key] is not None else 'n/a':{spec}}" for key, _, spec in columns))


def html_page(title: str, body: str) -> str:
    """A complete, self-contained HTML page."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f"<style>{PAGE_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def html_table(head: list[str], rows: list[list[str]]) -> str:
    """An HTML table; ``head`` is plain text, cells are already-escaped HTML."""
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def html_link(target: str | Path, page_dir: Path, text: str) -> str:
    """A link relative to the page's directory, so a report folder can move as a whole."""
    href = os.path.relpath(Path(target).resolve(), page_dir.resolve())
    return f'<a href="{html.escape(href)}">{html.escape(text)}</a>'


def html_figures(paths) -> str:
    """PNG files embedded as figures (the page needs no other file)."""
    return "".join(
        f'<figure><img alt="{html.escape(p.stem)}" '
        f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(p.stem.replace('_', ' '))}</figcaption></figure>" for p in paths if p.is_file())
