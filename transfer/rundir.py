"""The run directory: the one artifact that travels from training to compare, export and serve.

Layout of ``artifacts/runs/<name>/``::

    config.json        effective config, written first (a run dir without manifest.json is incomplete)
    checkpoints/       last.weights.h5 + rng.npz + state.json (resume), best.weights.npz (best validation accuracy)
    history.csv        one row per completed epoch
    logs/              TensorBoard
    model.keras        the final model (best weights restored)
    evaluation.json    test metrics
    plots/             accuracy/loss curves, confusion matrix
    manifest.json      written last, atomically: its presence with status "complete" marks a complete run
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from transfer.errors import UserError

MANIFEST = "manifest.json"
CONFIG = "config.json"
EVALUATION = "evaluation.json"
MODEL = "model.keras"
HISTORY = "history.csv"
MANIFEST_VERSION = 1



def file_mode() -> int:
    """What a plain open() gives a new file: 0666 less the process umask (read from /proc without changing it; where
    /proc has no Umask line, the umask is read by setting it back at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON atomically: a temporary file in the same directory, then a rename."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (a temporary file in the same directory, then a rename), readable by others as
    the umask says."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; others (a container's non-root user) must read what we write
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike):
    with open(path) as handle:
        return json.load(handle)


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "run"


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run directory whose run finished."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return read_json(manifest).get("status") == "complete"
    except (OSError, ValueError):
        return False


def load_complete(path: str | os.PathLike) -> dict:
    """The manifest of a complete run; a missing or unfinished run is a one-line :class:`UserError`."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run directory '{path}' does not exist; pass a directory under artifacts/runs/")
    if not is_complete(path):
        raise UserError(
            f"run directory '{path}' is incomplete (no complete {MANIFEST}); re-run the training "
            "command to resume it"
        )
    return read_json(path / MANIFEST)


def ensure_writable(root: Path) -> None:
    """Refuse an artifacts directory we cannot create or write into."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserError(
            f"artifacts directory '{root}' is not writable ({exc.strerror or exc}); pass --artifacts DIR"
        ) from exc


def check_writable(root: Path, flag: str = "--artifacts") -> None:
    """Refuse a directory that cannot be created or written into, without creating anything: a probe directory is
    made in the nearest existing ancestor and removed again."""
    root = Path(root).absolute()
    ancestor = next((p for p in (root, *root.parents) if p.exists()), Path("/"))
    if not ancestor.is_dir():
        raise UserError(f"'{root}' is not writable ('{ancestor}' is a file, not a directory); pass {flag} DIR")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=ancestor))
    except OSError as exc:
        raise UserError(f"'{root}' is not writable ({exc.strerror or exc}); pass {flag} DIR") from exc


def prepare(run_path: Path, config: dict, *, overwrite: bool = False, write: bool = True) -> str:
    """Claim ``run_path`` for ``config``: returns "new", "resume" or "complete".

    An existing directory made with a different config is never touched without ``overwrite``. With
    ``write`` off (a non-chief worker) nothing is created or removed; the directory is only checked.
    """
    config_file = run_path / CONFIG
    if not write:
        if config_file.is_file() and read_json(config_file) != json.loads(json.dumps(config, default=str)):
            raise UserError(f"run '{run_path.name}' exists with a different config; the chief decides, pass --name NEW")
        return "complete" if is_complete(run_path) else ("resume" if config_file.is_file() else "new")
    ensure_writable(run_path.parent)
    if run_path.exists() and overwrite:
        shutil.rmtree(run_path)
    if run_path.exists() and any(run_path.iterdir()):
        if not config_file.is_file():
            raise UserError(
                f"'{run_path}' exists and is not a run directory; pass --name NEW or remove it"
            )
        old = read_json(config_file)
        if old != json.loads(json.dumps(config, default=str)):
            diff = _first_difference(old, json.loads(json.dumps(config, default=str)))
            raise UserError(
                f"run '{run_path.name}' exists with a different config ({diff}); pass --name NEW "
                "to start another run or --overwrite to replace it"
            )
        return "complete" if is_complete(run_path) else "resume"
    run_path.mkdir(parents=True, exist_ok=True)
    write_json(config_file, config)
    return "new"


def _first_difference(old, new, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {old!r} -> {new!r}"
