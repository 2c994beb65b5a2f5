"""Sub-commands ``transfer export``, ``transfer verify`` and ``transfer bench`` (registered in transfer.cli)."""

from __future__ import annotations

import sys
from pathlib import Path

from export.contract import BENCH, FAILED_EXPORT, FAILED_VERIFICATION, MANIFEST, SECTION, SOURCE_RUN, STATUS_KEY, VERIFY
from export.formats import FAMILIES, FORMATS, ExportOptions, VerifyOptions, quantize_variants
from transfer.config import BenchConfig
from transfer.options import add_config_args, build, cli_fields, flag_of, given


def register(subparsers) -> None:
    """Add the export commands to ``transfer``'s sub-parsers."""
    p = subparsers.add_parser("export", help="export a run to SavedModel, TFLite and ONNX and verify each artifact")
    p.add_argument("run_dir")
    names = ", ".join(list(FAMILIES) + [n for n in FORMATS if n not in FAMILIES])
    p.add_argument("--formats", help=f"comma-separated, from: {names} (default: all)")
    p.add_argument("--quantize", help=f"quantized variants of the chosen families besides float32: "
                   f"{quantize_variants()} (default: all when --formats is not given)")
    p.add_argument("--out", help="export directory (default: <artifacts>/exports/<run name>)")
    add_config_args(p, ExportOptions, unset=True)  # unset: a format option given for no chosen format is refused
    p.add_argument("--no-verify", action="store_true", help="skip parity verification")
    add_config_args(p, VerifyOptions, unset=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an export of another run at --out (re-exporting the same run needs no flag)")
    _add_trust_flag(p)
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("verify", help="re-verify the artifacts of an export directory against their run")
    p.add_argument("export_dir")
    add_config_args(p, VerifyOptions, unset=True)
    _add_trust_flag(p)
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("bench", help="latency, throughput and size of every artifact in an export directory")
    p.add_argument("export_dir")
    add_config_args(p, BenchConfig)
    p.add_argument("--json", action="store_true", help=f"print {BENCH} instead of the table")
    p.set_defaults(func=cmd_bench)


def _add_trust_flag(p) -> None:
    p.add_argument("--trust-hub-handle", dest="trust_hub", action="store_true",
                   help="let a Hub layer of the run's model.keras load its module from its recorded handle, outside "
                        "the run directory, or run file/network ops (only for runs you trust; see docs/security.md)")


def _finish(result, command: str) -> int:
    """0 when every format this command produced or checked passed; else 1 and one line on stderr: which formats
    failed and why, that failed artifacts are kept (marked in the manifest) and how to re-check or re-export."""
    formats = result.formats
    failed = [name for name, entry in formats.items()
              if entry[STATUS_KEY] in (FAILED_EXPORT, FAILED_VERIFICATION) and
              (name in result.reports or entry[STATUS_KEY] == FAILED_EXPORT)]
    if not failed:
        return 0
    out, run = result.out, result.manifest[SECTION].get(SOURCE_RUN) or "RUN_DIR"
    parts, todo = [], []
    for name in failed:
        entry, report = formats[name], result.reports.get(name) or {}
        reasons = report.get("failures") or [entry.get("error") or "see verify.json"]
        more = f" and {len(reasons) - 1} more" if len(reasons) > 1 else ""
        parts.append(f"{name}: {entry[STATUS_KEY]} ({reasons[0]}{more})")
    verification = [n for n in failed if formats[n][STATUS_KEY] == FAILED_VERIFICATION]
    exports = [n for n in failed if formats[n][STATUS_KEY] == FAILED_EXPORT]
    if verification:
        one = len(verification) == 1
        todo.append(f"{'its artifact is' if one else 'their artifacts are'} kept in {out}, marked "
                    f"{FAILED_VERIFICATION} in {MANIFEST} (do not ship {'it' if one else 'them'}; details in "
                    f"{VERIFY}); re-check with `transfer verify {out} --verify-samples 5000`")
    if exports:
        todo.append(f"re-export with `transfer export {run} --formats {','.join(exports)}`")
    print(f"transfer {command}: {len(failed)} of {len(formats)} formats failed: {'; '.join(parts)}; "
          f"{'; '.join(todo)}", file=sys.stderr)
    return 1


def cmd_export(args) -> int:
    from export.exporter import ExportConfig, run_export
    from export.verify import format_table

    values = given(args, ExportOptions)
    options = build(ExportOptions, values, "the export options")
    flags = {f.name: flag_of(f) for f in cli_fields(ExportOptions)}
    samples = build(VerifyOptions, given(args, VerifyOptions), "the verify options").verify_samples
    cfg = ExportConfig(run_dir=args.run_dir, formats=args.formats, quantize=args.quantize, out=args.out,
                       options=options, given_options={k: flags[k] for k in values}, verify=not args.no_verify,
                       verify_samples=samples, overwrite=args.overwrite, trust_hub=args.trust_hub)
    result = run_export(cfg)
    if result.reports:
        print(format_table(result.reports))
    print(f"export directory: {result.out}")
    return _finish(result, "export")


def cmd_verify(args) -> int:
    from export.exporter import reverify
    from export.verify import format_table

    samples = build(VerifyOptions, given(args, VerifyOptions), "the verify options").verify_samples
    result = reverify(Path(args.export_dir), samples, trust_hub=args.trust_hub)
    print(format_table(result.reports))
    return _finish(result, "verify")


def cmd_bench(args) -> int:
    import json

    from export.bench import bench, format_table

    settings = build(BenchConfig, given(args, BenchConfig), "the bench options")
    report = bench(Path(args.export_dir), settings)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    print(f"wrote {Path(args.export_dir) / BENCH}", file=sys.stderr)
    return 0
