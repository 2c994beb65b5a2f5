"""``transfer export``: write every chosen format of a run, record it in a manifest, and verify it against Keras.

What the export directory holds and what its manifest keys are is export.contract's; how each format is written,
loaded and described is its row in export.formats. This module only runs the rows and records the results.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import socket
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export import contract
from export.card import write_card
from export.contract import (
    CLASS_COUNTS_KEY,
    EVALUATION,
    EXPORTED,
    EXPORTED_AT,
    FAILED_EXPORT,
    FAILED_VERIFICATION,
    FILE_KEY,
    FORMATS_KEY,
    LABELS,
    LABELS_KEY,
    MANIFEST,
    SECTION,
    SHA256_KEY,
    SIZE_KEY,
    SOURCE_RUN,
    STATUS_KEY,
    VERIFICATION_KEY,
    VERIFIED,
    VERIFY,
    VERSIONS_KEY,
    ExportDir,
    Untrusted,
    sha256_of,
    size_of,
)
from export.formats import FORMATS, ExportContext, ExportOptions, Format, VerifyOptions, check_options, select_formats
from export.runtimes import ReachesOutside
from transfer import rundir
from transfer.errors import UserError


@dataclass(frozen=True)
class ExportConfig:
    """What ``transfer export`` was asked to do."""

    run_dir: str
    formats: str | None = None
    quantize: str | None = None
    out: str | None = None
    options: ExportOptions = field(default_factory=ExportOptions)
    given_options: dict = field(default_factory=dict)  # ExportOptions field -> flag the user passed
    verify: bool = True
    verify_samples: int | None = None  # None: VerifyOptions' default
    overwrite: bool = False  # replace an export of another run at ``out``
    trust_hub: bool = False  # --trust-hub-handle: let a Hub layer load its module from outside the run directory


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    reports: dict

    @property
    def formats(self) -> dict[str, dict]:
        """Format name -> manifest entry."""
        return self.manifest[SECTION][FORMATS_KEY]


def default_out(run_dir: Path, run_name: str) -> Path:
    """``<artifacts>/exports/<name>`` beside the run's ``<artifacts>/runs/<name>``."""
    run_dir = Path(run_dir).resolve()
    root = run_dir.parent.parent if run_dir.parent.name == "runs" else Path("artifacts")
    return root / "exports" / run_name


def calibration_images(train, n: int, seed: int = 0) -> np.ndarray:
    """``n`` images of the training split ``train`` (seeded, without replacement: export.verify.calibration_index,
    which verification leaves out) as float32 0..255; no images is a UserError."""
    from export.verify import calibration_index, split_pixels

    if n <= 0:
        raise UserError(f"--calibration-samples {n} must be > 0")
    if len(train) == 0:
        raise UserError("int8 quantization needs calibration data, but the run's training split is empty; "
                        "drop int8 from --quantize")
    return split_pixels(train, calibration_index(len(train), n, seed)).astype(np.float32)


def _seed(source: dict) -> int:
    return int(source["config"]["train"].get("seed", 0))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------------------------------------- the export directory
# An export is built whole in a staging directory beside its destination, ``.<name>.export-<host>-<pid>``, and swapped
# in with two renames (the old directory goes to ``.<name>.old-<host>-<pid>`` and is removed), so a directory never
# mixes two exports: a reader sees the old export or the new one. A killed export leaves its staging directory; the
# next export to the same destination removes it once its process is gone (and finishes an interrupted swap).
#
# Two exports never race into one destination: each holds ``.<name>.lock`` beside it (flock, non-blocking) from its
# first look at the destination to its commit, so a second one is refused at once (one line, exit 2) and nothing of
# it is written. Where that lock cannot be taken (no flock, a file system that ignores it), the commit re-checks the
# destination: one changed since the export looked at it (another writer committed meanwhile) is not replaced, and
# this export is refused instead of silently undoing the other.

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>export|old)-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)$")


def _temporary(out: Path, kind: str, pid: int | None = None) -> Path:
    return out.parent / f".{out.name}.{kind}-{_HOST}-{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Remove what killed exports to ``out`` left beside it (their process, on this host, is gone); an export
    killed between the two renames of its swap is finished (the complete new one, else the old one, put back).
    Returns the paths removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    stale: dict[int, dict[str, Path]] = {}
    for entry in out.parent.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and match["name"] == out.name and match["host"] == _HOST and not _alive(int(match["pid"])):
            stale.setdefault(int(match["pid"]), {})[match["kind"]] = entry
    removed = []
    for kinds in stale.values():
        if "old" in kinds and not os.path.lexists(out):
            staged = kinds.get("export")
            keep = staged if staged is not None and (staged / MANIFEST).is_file() else kinds["old"]
            os.replace(keep, out)
            kinds = {k: v for k, v in kinds.items() if v != keep}
        for path in kinds.values():
            _remove(path)
            removed.append(path)
    return removed


def _identity(out: Path) -> tuple | None:
    """What the destination is now (None: nothing there): its inode and its manifest's bytes; another export
    committed into it changes both."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return None
    try:
        manifest = (out / MANIFEST).read_bytes()
    except OSError:
        manifest = None
    return st.st_dev, st.st_ino, manifest


class _OutLock:
    """``.<name>.lock`` beside the destination, held with flock from ``acquire`` until ``release`` (which removes
    it); a second holder is refused at once with a one-line UserError."""

    def __init__(self, out: Path):
        self.out, self.path, self.fd = out, out.parent / f".{out.name}.lock", None

    def acquire(self) -> bool:
        """Take the lock (True), or False where this system has no flock (the commit's re-check still holds)."""
        try:
            import fcntl
        except ImportError:
            return False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"export directory '{self.out}' is being written by another export right now; "
                                "wait for it to finish (then export again), or pass --out DIR") from None
            except OSError:  # a file system without locks
                os.close(fd)
                return False
            try:
                held = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                held = False
            if held:
                self.fd = fd
                return True
            os.close(fd)  # its holder released and removed it while we waited for it: lock the one there now

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still held: whoever opens the path next makes a new one
            os.close(self.fd)
            self.fd = None


class _Staging:
    """The staging directory of one export (see above): ``open`` (which takes the destination's lock), ``look``
    at the destination, fill ``path``, then ``commit`` or ``discard`` (either releases the lock)."""

    def __init__(self, out: Path):
        self.out = out
        self.path = _temporary(out, "export")
        self.created: list[Path] = []  # parent directories this export made (removed again if it fails)
        self.lock = _OutLock(out)
        self.seen: tuple | None = None  # the destination as ``look`` found it
        self.made = False  # ``path`` is this export's (not yet made, or refused before: not to be removed)

    def open(self) -> Path:
        try:
            missing = [p for p in [self.out.absolute().parent, *self.out.absolute().parent.parents] if not p.exists()]
            for parent in reversed(missing):
                parent.mkdir()
                self.created.append(parent)
            self.lock.acquire()
            self.made = True
            _remove(self.path)
            self.path.mkdir()
        except OSError as exc:
            self.discard()
            raise UserError(f"export directory '{self.out}' is not writable ({exc.strerror or exc}); "
                            "pass --out DIR (a directory you can write)") from exc
        except BaseException:
            self.discard()
            raise
        return self.path

    def look(self) -> None:
        """Remember the destination as it is now: ``commit`` replaces only that."""
        self.seen = _identity(self.out)

    def commit(self) -> None:
        if _identity(self.out) != self.seen:
            raise UserError(f"export directory '{self.out}' was written by another export while this one ran; it "
                            "is left as that export made it and nothing of this one is kept; export again to "
                            "replace it, or pass --out DIR")
        old = None
        if os.path.lexists(self.out):
            old = _temporary(self.out, "old")
            os.replace(self.out, old)
        os.replace(self.path, self.out)
        self.lock.release()
        if old is not None:
            _remove(old)

    def discard(self) -> None:
        if self.made:
            _remove(self.path)
        self.lock.release()
        for parent in reversed(self.created):
            with contextlib.suppress(OSError):  # not empty: someone else put something there
                parent.rmdir()


def _previous_export(out: Path, run_dir: Path, source: dict, overwrite: bool) -> dict | None:
    """The manifest of the export at ``out`` when it is one of this very run (its formats may be kept), else None;
    a directory holding anything else is refused (another run's export without ``overwrite``, or not an export)."""
    if not os.path.lexists(out):
        return None
    if not out.is_dir():
        raise UserError(f"export directory '{out}' is a file; pass --out DIR")
    previous = contract.read_manifest(out)
    if previous is None:
        if any(out.iterdir()):
            raise UserError(f"export directory '{out}' is not empty and holds no export (no {MANIFEST} with an "
                            f"'{SECTION}' section); pass --out NEW_DIR (nothing there is touched)")
        return None
    recorded = previous[SECTION].get(SOURCE_RUN)
    same_manifest = {k: v for k, v in previous.items() if k != SECTION} == source
    same_path = bool(recorded) and Path(recorded) == run_dir.resolve()
    if not (same_manifest or same_path):
        if overwrite:
            return None
        raise UserError(f"export directory '{out}' holds an export of another run ({recorded or 'unrecorded'}); "
                        "pass --overwrite to replace it, or --out DIR for another directory")
    if not same_manifest:
        print(f"export: {out} holds an export of an earlier training of this run; it is replaced whole", flush=True)
        return None
    return None if overwrite else previous


def _link_or_copy(src: str, dest: str) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _keep_previous(previous: dict, out: Path, stage: Path, rows: list[Format]) -> tuple[dict, dict]:
    """The entries and parity reports of the previous export (same run) for formats not exported again; their
    artifacts are linked into ``stage`` when they still match their sha256 (else they are dropped, with a note).
    A format that failed to export has no artifact: its entry is not kept (this export reports only its own)."""
    redone = {row.name for row in rows}
    reports = contract.read_reports(out) or {}
    entries, kept_reports = {}, {}
    root = out.resolve()
    for name, entry in (previous[SECTION].get(FORMATS_KEY) or {}).items():
        if name in redone or not isinstance(entry, dict) or entry.get(STATUS_KEY) == FAILED_EXPORT:
            continue
        file = entry.get(FILE_KEY) or ""
        src = (out / file).resolve()
        if not (file and root in src.parents and src.exists() and entry.get(SHA256_KEY) == sha256_of(src)):
            print(f"export: {name} of the earlier export is dropped (its file is missing or does not match "
                  "its sha256)", flush=True)
            continue
        if src.is_dir():
            shutil.copytree(src, stage / file, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(src), str(stage / file))
        entries[name] = entry
        if name in reports:
            kept_reports[name] = reports[name]
    return entries, kept_reports


def run_export(cfg: ExportConfig) -> ExportResult:
    """Export a complete run; failures of single formats are recorded, never raised.

    The export is built in a staging directory and swapped in whole (see above); anything refused or raised
    leaves the destination as it was and nothing half-written. Re-exporting the same run keeps the formats not
    exported again; a destination holding another run's export is refused unless ``cfg.overwrite``.
    """
    run_dir = Path(cfg.run_dir)
    source = rundir.load_complete(run_dir)
    rows = select_formats(cfg.formats, cfg.quantize)
    check_options(rows, cfg.given_options)
    if cfg.options.calibration_samples <= 0:
        raise UserError(f"--calibration-samples {cfg.options.calibration_samples} must be > 0")
    if cfg.verify_samples is not None:
        VerifyOptions(cfg.verify_samples)  # refused (one line) before anything is loaded
    if cfg.options.opset is not None and not 7 <= cfg.options.opset <= 18:
        raise UserError(f"--opset {cfg.options.opset} is outside what tf2onnx supports (7..18)")
    for row in rows:
        if cfg.options.opset is not None and row.min_opset and cfg.options.opset < row.min_opset:
            raise UserError(f"--opset {cfg.options.opset} is too old for {row.name}, which needs {row.min_opset} or "
                            f"later; pass --opset {row.min_opset} or drop {row.name} from --formats")
    out = Path(cfg.out) if cfg.out else default_out(run_dir, source["name"])
    staging = _Staging(out)
    stage = staging.open()  # --out's lock first: what is checked below is what the commit replaces
    try:
        clean_stale(out)
        previous = _previous_export(out, run_dir, source, cfg.overwrite)
        staging.look()
        manifest, reports = _export_into(stage, out, cfg, run_dir, source, rows, previous)
        staging.commit()
    except BaseException:
        staging.discard()
        raise
    return ExportResult(out, manifest, reports)


def _export_into(stage: Path, out: Path, cfg: ExportConfig, run_dir: Path, source: dict, rows: list[Format],
                 previous: dict | None) -> tuple[dict, dict]:
    from transfer.runmodel import load_run_model

    model = load_run_model(run_dir, trust_hub=cfg.trust_hub)  # refused models stop here, before any data is read
    from transfer.data import load_run_dataset

    needs_calibration = any(r.needs_calibration for r in rows)
    dataset = load_run_dataset(source, run_dir, "pass --no-verify") if cfg.verify or needs_calibration else None
    calibration = None
    if needs_calibration:
        if cfg.options.calibration_samples <= 0 or len(dataset.train) == 0:  # refuse before any work
            calibration_images(dataset.train, cfg.options.calibration_samples)

        def calibration(n):
            return calibration_images(dataset.train, n, seed=_seed(source))

    classes = list(source["classes"])
    (stage / LABELS).write_text("\n".join(classes) + "\n")
    entries, reports = _keep_previous(previous, out, stage, rows) if previous else ({}, {})
    work = stage / ".work"
    ctx = ExportContext(model, work, calibration)
    predictors = {}
    try:
        for row in rows:
            print(f"export: {row.name} -> {out / row.file}", flush=True)
            entries[row.name], predictors[row.name] = _export_one(row, ctx, stage, cfg.options, classes)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    new_reports, verify_set = {}, None
    if cfg.verify:
        verify_set = _verification_set(dataset, entries, cfg.verify_samples, _seed(source))
        new_reports = _verify_all(model, predictors, verify_set, entries)
    if cfg.verify or reports:
        _write_reports(stage, run_dir.resolve(), {**reports, **new_reports}, verify_set)
    if (run_dir / rundir.EVALUATION).is_file():  # the run's per-class test metrics travel with the export (the card)
        rundir.write_text(stage / EVALUATION, (run_dir / rundir.EVALUATION).read_text(encoding="utf-8"))
    counts = _class_counts(dataset, classes) if dataset is not None else (
        (previous or {}).get(SECTION, {}).get(CLASS_COUNTS_KEY))
    manifest = _manifest(source, run_dir, entries, cfg.verify, counts)
    rundir.write_json(stage / MANIFEST, manifest)  # a staging directory with it is complete
    write_card(stage, name=out.name)  # MODEL_CARD.md, from the files above
    return manifest, new_reports


def _class_counts(dataset, classes: list[str]) -> dict[str, dict[str, int]]:
    """Split -> class -> images of the run's dataset (what the model card's data section shows)."""
    return {split: dict(zip(classes, np.bincount(np.asarray(getattr(dataset, split).y, np.int64),
                                                 minlength=len(classes)).tolist(), strict=False))
            for split in ("train", "val", "test")}


def _export_one(row: Format, ctx: ExportContext, stage: Path, options: ExportOptions, classes: list[str]):
    dest = stage / row.file
    try:
        facts = row.export(ctx, dest, options) or {}
        if row.embed_labels is not None:
            facts[LABELS_KEY] = row.embed_labels(dest, classes)
        predictor = row.load(dest)  # proves the artifact loads in its runtime
        if row.describe is not None:
            facts.update(row.describe(dest, predictor))
    except Exception as exc:  # one format failing must not stop the others: record it (traceback kept) and go on
        _remove(dest)
        print(f"export: {row.name} failed: {_one_line(exc)} (traceback in the manifest's entry)", flush=True)
        return {FILE_KEY: row.file, STATUS_KEY: FAILED_EXPORT, "error": _one_line(exc),
                "traceback": traceback.format_exc()}, None
    entry = {
        FILE_KEY: row.file,
        STATUS_KEY: EXPORTED,
        SHA256_KEY: sha256_of(dest),
        SIZE_KEY: size_of(dest),
        "inputs": predictor.inputs,
        "outputs": predictor.outputs,
        **facts,
    }
    return entry, predictor


def _verification_set(dataset, entries: dict, samples: int | None, seed: int):
    """The images every artifact is verified on (export.verify.verification_set), leaving out the training images
    that int8 calibration used (the largest ``calibration_samples`` an entry records, drawn with the same seed)."""
    from export.verify import verification_set

    samples = VerifyOptions().verify_samples if samples is None else VerifyOptions(samples).verify_samples
    calibrated = max([int(e.get("calibration_samples") or 0) for e in entries.values() if isinstance(e, dict)] or [0])
    return verification_set(dataset, samples, seed, calibrated)


def _verify_all(model, predictors: dict, verify_set, entries: dict) -> dict:
    from export.verify import predict_batched, verify

    inputs, labels = verify_set.images, verify_set.labels
    reference = predict_batched(lambda b: model.predict_on_batch(b), inputs)
    reports = {}
    for name, predictor in predictors.items():
        if predictor is None:
            reports[name] = {"passed": False, "failures": [entries[name]["error"]], STATUS_KEY: FAILED_EXPORT}
            continue
        try:
            report = verify(reference, predictor, inputs, labels, FORMATS[name].thresholds)
        except Exception as exc:  # a runtime that cannot run the artifact fails verification, it does not crash
            report = {"passed": False, "failures": [f"inference failed: {_one_line(exc)}"],
                      "traceback": traceback.format_exc()}
        report[STATUS_KEY] = VERIFIED if report["passed"] else FAILED_VERIFICATION
        entries[name][STATUS_KEY] = report[STATUS_KEY]
        entries[name]["verification"] = {k: report.get(k) for k in _SUMMARY if k in report}
        reports[name] = report
    return reports


def _manifest(source: dict, run_dir: Path, formats: dict, verified: bool, class_counts: dict | None = None) -> dict:
    from importlib import metadata

    from transfer.runner import library_versions

    versions = {**library_versions()}
    for package in ("onnx", "onnxruntime", "tf2onnx", "ai-edge-litert"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        **source,
        SECTION: {
            SOURCE_RUN: str(Path(run_dir).resolve()),
            EXPORTED_AT: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            LABELS_KEY: LABELS,
            VERIFICATION_KEY: VERIFY if verified else "skipped (--no-verify)",
            FORMATS_KEY: formats,
            VERSIONS_KEY: versions,
            **({CLASS_COUNTS_KEY: class_counts} if class_counts else {}),
        },
    }


# what a format's manifest entry repeats of its verification report (verify.json holds the whole report)
_SUMMARY = ("samples", "top1_agreement", "agreement_ci95", "decisive_samples", "decisive_agreement", "decisive_ci95",
            "max_abs_diff", "mean_abs_diff", "p99_abs_diff", "median_tv", "accuracy", "accuracy_drop", "p_value",
            "failures", "notes")


def _write_reports(out: Path, run_dir: Path, reports: dict, verify_set=None) -> None:
    """verify.json: the reports and, when this export verified, which images (how many from each split)."""
    images = dict(verify_set.origin) if verify_set is not None else None
    rundir.write_json(out / VERIFY, {"images": images, "labelled": "test", SOURCE_RUN: str(run_dir),
                                     FORMATS_KEY: reports})


def reverify(export_dir: Path, samples: int | None = None, *, trust_hub: bool = False) -> ExportResult:
    """Verify the artifacts already in an export directory against their source run again.

    The source run's model is loaded by the one safe loader (``trust_hub`` is ``--trust-hub-handle``). An artifact
    is loaded only when its sha256 is the one the manifest lists; one without a listed sha256, or with another,
    fails verification unloaded. ``samples``: how many images (None: VerifyOptions' default).
    """
    from transfer.runmodel import load_run_model

    if samples is not None:
        VerifyOptions(samples)
    export = ExportDir.open(export_dir, check_name=False)
    manifest = export.manifest
    run_dir = export.source_run
    if run_dir is None:
        raise UserError(f"{export.path / MANIFEST} records no {SOURCE_RUN}; export the run again with "
                        "`transfer export RUN_DIR`")
    source = rundir.load_complete(run_dir)
    model = load_run_model(run_dir, trust_hub=trust_hub)
    from transfer.data import load_run_dataset

    dataset = load_run_dataset(source, run_dir, "pass --no-verify")
    entries = export.formats()
    predictors = {}
    for name, entry in entries.items():
        if entry.get(STATUS_KEY) == FAILED_EXPORT or name not in FORMATS:
            continue
        try:  # read once: the runtime opens the bytes whose sha256 was checked, not the path again
            artifact = export.read_artifact(name)
        except Untrusted as refused:
            entry["sha256_matches"] = False
            predictors[name] = None
            entry["error"] = f"not loaded: {refused}"
            continue
        entry["sha256_matches"] = True
        try:
            predictors[name] = FORMATS[name].load(artifact)
        except ReachesOutside:  # a graph that would run ops outside the model is refused, not verified
            raise
        except Exception as exc:  # a damaged artifact fails verification (traceback kept for bugs)
            predictors[name] = None
            entry["error"] = f"cannot load: {_one_line(exc)}"
            entry["traceback"] = traceback.format_exc()
    verify_set = _verification_set(dataset, entries, samples, _seed(source))
    reports = _verify_all(model, predictors, verify_set, entries)
    for name, predictor in predictors.items():
        if predictor is None:
            entries[name][STATUS_KEY] = FAILED_VERIFICATION
            reports[name][STATUS_KEY] = FAILED_VERIFICATION
    _write_reports(export.path, run_dir, reports, verify_set)
    rundir.write_json(export.path / MANIFEST, manifest)
    write_card(export.path)  # the card's verification table follows the new reports
    return ExportResult(export.path, manifest, reports)
