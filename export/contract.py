"""The export directory contract: file names, manifest keys, checksums and :class:`ExportDir`, the one reader.

``transfer export`` writes an export directory; verify, bench, predict, serve and the pipeline read it. Every fact
about its layout lives here (no TensorFlow, no NumPy)::

    manifest.json    the run's manifest plus an "export" section (MANIFEST, SECTION and the *_KEY names below)
    labels.txt       one class name per line, line i = output index i (LABELS)
    verify.json      parity reports per format (VERIFY)
    bench.json       latency and throughput per format (BENCH)
    evaluation.json  the source run's test evaluation, copied (per-class metrics, confusion matrix) (EVALUATION)
    MODEL_CARD.md    the model card, generated from the files above (CARD; export.card), re-rendered by bench
    <format files>   one per row of the format table (export.formats), named by the entry's "file"

An artifact is loaded from one read (:meth:`ExportDir.read_artifact`, an :class:`Artifact`): its bytes are read
once, their sha256 checked against the manifest and the runtime opened from those very bytes, never from the path
again, so a file rewritten in place meanwhile cannot be loaded under the digest of what it held before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from transfer.errors import UserError

MANIFEST = "manifest.json"
LABELS = "labels.txt"
VERIFY = "verify.json"
BENCH = "bench.json"
EVALUATION = "evaluation.json"
CARD = "MODEL_CARD.md"

# manifest.json: the export section and its keys
SECTION = "export"
SOURCE_RUN = "source_run"  # absolute path of the run directory the export was made from
EXPORTED_AT = "exported_at"  # ISO 8601 UTC time of the export
LABELS_KEY = "labels"
VERIFICATION_KEY = "verification"
VERSIONS_KEY = "versions"
CLASS_COUNTS_KEY = "class_counts"  # split -> class -> images, when the export read the run's dataset
FORMATS_KEY = "formats"  # format name -> entry
# keys of one format entry
FILE_KEY = "file"
STATUS_KEY = "status"
SHA256_KEY = "sha256"
SIZE_KEY = "size_bytes"

# entry statuses, in the order an artifact goes through them
EXPORTED = "exported"
VERIFIED = "verified"
FAILED_EXPORT = "failed-export"
FAILED_VERIFICATION = "failed-verification"

# Model names appear in URLs and metrics labels: no separators, no dots first, bounded length.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
INPUT_CONTRACT = (("dtype", "float32"), ("layout", "NHWC"), ("color", "RGB"))
ONNX_OUTPUT = "probabilities"  # the ONNX graph's one output (softmax over the labels), named for what it is
PIXEL_RANGE = (0.0, 255.0)  # what every artifact takes: raw RGB pixels, resized, preprocessing inside the graph


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a directory's relative paths and contents in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def size_of(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a directory."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_manifest(path: str | os.PathLike) -> dict | None:
    """``path``'s manifest.json when it is a JSON object with an export section, else None (never raises)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get(SECTION), dict):
        return None
    return manifest


def read_reports(path: str | os.PathLike) -> dict[str, dict] | None:
    """Format name -> parity report from ``path``'s verify.json; None when there is none or it is unreadable."""
    try:
        reports = json.loads((Path(path) / VERIFY).read_text(encoding="utf-8")).get(FORMATS_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return reports if isinstance(reports, dict) else None


def _labels(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


class Untrusted(UserError):
    """An artifact that must not be loaded (missing, no sha256 listed, another sha256); ``str()`` says why in a few
    words (``model.onnx is missing``), for callers to put in their own line."""


@dataclass(frozen=True, eq=False)
class Artifact:
    """An artifact read once: a file's bytes (``content``) or a private copy of a directory (``snapshot``, a
    SavedModel), with the sha256 of exactly what was read (computed as :func:`sha256_of` computes it for the path).
    Runtimes load these bytes or this copy, so what runs is what was hashed."""

    path: Path  # where it was read from (for messages)
    sha256: str
    content: bytes | None = None
    snapshot: Path | None = None
    keep: object = field(default=None, repr=False)  # the TemporaryDirectory holding ``snapshot`` (removed with it)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Artifact:
        """Read ``path`` once (a file into memory, a directory into a private temporary copy) and hash that read.
        Raises OSError when it cannot be read."""
        path = Path(path)
        if not path.is_dir():
            content = path.read_bytes()
            return cls(path, hashlib.sha256(content).hexdigest(), content=content)
        keep = tempfile.TemporaryDirectory(prefix=".artifact-")
        snapshot = Path(keep.name) / path.name
        snapshot.mkdir()
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            relative = file.relative_to(path)
            digest.update(str(relative).encode() + b"\0")
            (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
            with open(file, "rb") as source, open(snapshot / relative, "wb") as copy:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    copy.write(chunk)
        return cls(path, digest.hexdigest(), snapshot=snapshot, keep=keep)

    @property
    def location(self) -> str:
        """What a runtime that wants a path opens: the private copy of a directory, else the path read."""
        return str(self.snapshot or self.path)


@dataclass(frozen=True)
class ExportDir:
    """A checked export directory: manifest, classes and input spec (no runtime opened). Make one with ``open``."""

    path: Path
    name: str
    manifest: dict
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]  # (H, W, C) of the raw-pixel input
    manifest_sha256: str = ""  # of the very manifest.json bytes ``manifest`` was parsed from

    @staticmethod
    def is_export_dir(path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a readable manifest.json with an export section (nothing else is checked)."""
        return read_manifest(path) is not None

    @classmethod
    def open(cls, path: str | os.PathLike, name: str | None = None, *, check_name: bool = True) -> ExportDir:
        """Read and check ``manifest.json`` and ``labels.txt``; anything unusable is a one-line UserError.

        ``name`` defaults to the folder name; ``check_name`` requires it to be usable in URLs (what serving needs).
        """
        path = Path(path)
        file = path / MANIFEST
        if not file.is_file():
            raise UserError(f"{path} is not an export directory (no {MANIFEST}); create one with "
                            "`transfer export RUN_DIR`")
        try:
            raw = file.read_bytes()
            manifest = json.loads(raw.decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{file} is unreadable: {exc}") from exc
        if not isinstance(manifest, dict):
            raise UserError(f"{file} must hold a JSON object")
        if not isinstance(manifest.get(SECTION), dict):
            raise UserError(f"{path} is not an export directory ({MANIFEST} has no {SECTION!r} section: a run "
                            "directory?); create one with `transfer export RUN_DIR`")
        classes = manifest.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise UserError(f"{file}: 'classes' must be a non-empty list of names")
        for label in classes:  # a lone surrogate parses from JSON but cannot be written into an answer
            try:
                label.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(f"{file}: class name {label!r} is not valid Unicode text; re-run `transfer export` "
                                "from a run whose classes are") from None
        if (path / LABELS).is_file() and _labels(path / LABELS) != classes:
            raise UserError(f"{path / LABELS} does not match the manifest's classes; re-run `transfer export`")
        spec = manifest.get("input") or {}
        shape = spec.get("shape")
        if (not isinstance(shape, list) or len(shape) != 3 or
                not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape) or shape[2] != 3):
            raise UserError(f"{file}: input shape must be [H, W, 3], got {shape!r}")
        for key, expected in INPUT_CONTRACT:
            if spec.get(key, expected) != expected:
                raise UserError(f"{file}: input {key} {spec.get(key)!r} is not supported (expected {expected})")
        name = name or path.resolve().name
        if check_name and not NAME_PATTERN.match(name):
            raise UserError(f"model name {name!r} is not usable in URLs; use letters, digits, '.', '_', '-'")
        return cls(path=path, name=name, manifest=manifest, classes=tuple(classes), input_shape=tuple(shape),
                   manifest_sha256=hashlib.sha256(raw).hexdigest())

    # ------------------------------------------------------------------ manifest facts

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) images are resized to."""
        return self.input_shape[0], self.input_shape[1]

    @property
    def section(self) -> dict:
        """The manifest's export section."""
        return self.manifest[SECTION]

    @property
    def source_run(self) -> Path | None:
        """The run directory the export was made from (as recorded; it may have moved since)."""
        recorded = self.section.get(SOURCE_RUN)
        return Path(recorded) if recorded else None

    @property
    def source_run_name(self) -> str | None:
        """The source run's name, not its path (what may be shown to clients)."""
        return self.manifest.get("name") or (self.source_run.name if self.source_run else None)

    @property
    def exported_at(self) -> str | None:
        return self.section.get(EXPORTED_AT)

    def formats(self) -> dict[str, dict]:
        """Format name -> manifest entry, for every format the export lists (failed ones included)."""
        formats = self.section.get(FORMATS_KEY)
        return formats if isinstance(formats, dict) else {}

    def entry(self, fmt: str) -> dict:
        """The manifest entry of ``fmt`` ({} when the export does not list it)."""
        entry = self.formats().get(fmt)
        return dict(entry) if isinstance(entry, dict) else {}

    # ------------------------------------------------------------------ files

    def path_of(self, fmt: str) -> Path:
        """Where ``fmt``'s artifact lives: the entry's ``file``, else the format table's; never outside the export."""
        file = self.entry(fmt).get(FILE_KEY)
        if not file:
            from export.formats import get_format  # the table's file name; formats imports no TensorFlow

            file = get_format(fmt).file
        path = (self.path / file).resolve()
        if self.path.resolve() not in path.parents:
            raise UserError(f"{self.path / MANIFEST}: {fmt} file {file!r} points outside the export directory")
        return path

    def sha256_matches(self, fmt: str) -> bool:
        """Whether ``fmt``'s artifact exists and has the sha256 its entry records."""
        return self.untrusted(fmt) is None

    def untrusted(self, fmt: str) -> str | None:
        """Why ``fmt``'s artifact must not be loaded, or None when it may: only an artifact whose sha256 the manifest
        lists, unchanged, is ever loaded (a missing file, an unlisted sha256 or another one are refused)."""
        path = self.path_of(fmt)
        if not path.exists():
            return f"{path.name} is missing"
        expected = self.entry(fmt).get(SHA256_KEY)
        if not expected:
            return f"{MANIFEST} lists no sha256 for {path.name}"
        if sha256_of(path) != expected:
            return f"{path.name} does not match the sha256 in {MANIFEST} (corrupt or replaced)"
        return None

    def read_artifact(self, fmt: str) -> Artifact:
        """``fmt``'s artifact read once, with the sha256 the manifest lists checked on the bytes read (raises
        :class:`Untrusted` otherwise: missing, unreadable, unlisted or another sha256). Load the runtime from what
        this returns, never from the path: the file may be rewritten between two reads.

        The manifest is read again afterwards: when it changed meanwhile (an export rewritten in place), the labels
        this ExportDir holds may not be the ones of the bytes read, so that is refused too (try again later)."""
        path = self.path_of(fmt)
        expected = self.entry(fmt).get(SHA256_KEY)
        if not path.exists():
            raise Untrusted(f"{path.name} is missing")
        if not expected:
            raise Untrusted(f"{MANIFEST} lists no sha256 for {path.name}")
        try:
            artifact = Artifact.read(path)
        except OSError as exc:  # removed or replaced while read
            raise Untrusted(f"{path.name} could not be read ({exc.strerror or exc})") from exc
        if artifact.sha256 != expected:
            raise Untrusted(f"{path.name} does not match the sha256 in {MANIFEST} (corrupt or replaced)")
        self.check_unchanged()
        return artifact

    def check_unchanged(self) -> None:
        """Raise :class:`Untrusted` when manifest.json no longer holds the bytes this ExportDir was opened from (the
        export changed while it was read)."""
        if not self.manifest_sha256:
            return
        try:
            now = hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()
        except OSError:
            now = None
        if now != self.manifest_sha256:
            raise Untrusted(f"{MANIFEST} changed while the export was read (rewritten in place?); try again once "
                            "it is complete")

    def check_sha256(self, fmt: str) -> str:
        """The sha256 of ``fmt``'s artifact; a UserError when it is missing, unlisted or differs from the manifest's."""
        path = self.path_of(fmt)
        if not path.exists():
            raise UserError(f"{self.path} has no {fmt} model ({path.name}); export it with "
                            f"`transfer export RUN_DIR --formats {fmt}`")
        digest = sha256_of(path)
        expected = self.entry(fmt).get(SHA256_KEY)
        if not expected:
            raise UserError(f"{path} has no sha256 in its manifest (only listed artifacts are loaded); re-export with "
                            f"`transfer export RUN_DIR --formats {fmt}`")
        if expected != digest:
            raise UserError(f"{path} does not match the sha256 in its manifest (corrupt or replaced); re-export")
        return digest

    def verification(self) -> dict[str, dict]:
        """Format name -> parity report from verify.json ({} when the export was not verified)."""
        return read_reports(self.path) or {}


def export_is_current(out: str | os.PathLike, run_dir: str | os.PathLike, run_manifest: dict,
                      wanted: list[str]) -> bool:
    """Whether ``out`` was exported from this very run (path and whole run manifest) and every format in
    ``wanted`` is verified (status in the manifest and a passed report in verify.json)."""
    manifest, reports = read_manifest(out), read_reports(out)
    if manifest is None or reports is None:
        return False
    export = manifest[SECTION]
    if Path(export.get(SOURCE_RUN) or "") != Path(run_dir).resolve():
        return False
    if {k: v for k, v in manifest.items() if k != SECTION} != run_manifest:
        return False
    formats = export.get(FORMATS_KEY) or {}
    return all((formats.get(n) or {}).get(STATUS_KEY) == VERIFIED and (reports.get(n) or {}).get("passed")
               for n in wanted)
