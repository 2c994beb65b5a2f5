"""The pipeline's steps after compare: export and verify every winner, benchmark the exports. Each step is resumable
and never raises: a failure is recorded in the step's entry, so one winner failing does not stop the others."""

from __future__ import annotations

from pathlib import Path

from transfer import rundir
from transfer.config import BenchConfig, ExportStepConfig
from transfer.errors import UserError

# What an export or benchmark of one winner may fail with (bad data, a converter or runtime refusing the model, the
# disk); anything else is a bug and raises.
EXPECTED_FAILURES = (UserError, OSError, RuntimeError, ValueError)


def _joined(value) -> str | None:
    if value is None:
        return None
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def export_settings(step: ExportStepConfig, formats: str | None = None, quantize: str | None = None) -> dict:
    """ExportConfig keyword arguments from the [export] table and the flags (flags win); validated up front."""
    from export.formats import QUANTIZE_CHOICES, ExportOptions, check_options, select_formats

    formats = formats if formats is not None else _joined(step.formats)
    quantize = quantize if quantize is not None else _joined(step.quantize)
    formats = None if formats in ("all", "") else formats
    quantize = ",".join(QUANTIZE_CHOICES) if quantize == "all" else quantize
    rows = select_formats(formats, quantize)
    given = {}
    options = ExportOptions()
    if step.calibration_samples is not None:
        given = {"calibration_samples": "[export] calibration_samples"}
        if step.calibration_samples <= 0:
            raise UserError(f"[export] calibration_samples = {step.calibration_samples} must be > 0")
        options = ExportOptions(calibration_samples=step.calibration_samples)
    check_options(rows, given)
    return {"formats": formats, "quantize": quantize, "options": options, "given_options": given,
            "wanted": [r.name for r in rows]}


def export_winner(run_dir: Path, settings: dict) -> dict:
    """Export + verify one winner (or keep a current export, see export.contract.export_is_current); expected
    failures are recorded, not raised."""
    from export.contract import export_is_current, read_reports
    from export.exporter import ExportConfig, default_out, run_export

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
        verify = read_reports(out) or {}
        entry["verify"] = {n: verify[n] for n in settings["wanted"] if n in verify}
        missing = [n for n in settings["wanted"] if n not in verify]
        failed = [n for n, r in entry["verify"].items() if not r.get("passed")]
        if missing or failed:
            entry["error"] = "; ".join([f"{n}: not verified" for n in missing] +
                                       [f"{n}: {', '.join(entry['verify'][n].get('failures') or ['failed'])}"
                                        for n in failed])
    except EXPECTED_FAILURES as exc:  # one winner failing must not stop the others; bugs still raise
        entry["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    entry["passed"] = entry["error"] is None
    return entry


def bench_export(out: Path, settings: BenchConfig) -> dict:
    """Benchmark an export dir unless its bench.json is newer than its manifest; expected failures are recorded."""
    from export.bench import bench
    from export.contract import BENCH, MANIFEST

    entry: dict = {"skipped": False, "error": None}
    try:
        path, manifest = out / BENCH, out / MANIFEST
        if path.is_file() and path.stat().st_mtime > manifest.stat().st_mtime:
            entry["skipped"] = True
            print(f"bench: {path} is newer than the export; kept", flush=True)
        else:
            bench(out, settings)
        entry["formats"] = rundir.read_json(path)["formats"]
    except EXPECTED_FAILURES as exc:
        entry["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return entry
