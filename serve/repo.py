"""What is served, from where: the export directories given on the command line and the model repository
(``--model-repo DIR``), read at start (``discover``) and, while the server runs, polled every ``--repo-poll-s``
seconds for exports added, replaced or removed (``RepoWatcher``). docs/serve.md, "Model repository and hot reload".

A repository holds one folder per model, named as the model is served: either an export directory itself (version
``1``) or numbered version folders, each an export directory (``name/1``, ``name/2``; the highest-numbered one that
loaded is served as the model's latest). Folders starting with a dot are skipped: the exporter builds a new export
in ``.<name>.export-*`` beside its destination and swaps it in with a rename (export/exporter.py), so a poll sees
the old export or the new one, never a mix.

A new or replaced export is opened exactly as at start (``ExportDir`` checks, the ONNX file read once, its sha256
checked on those bytes and the session opened from them, warm-up) on a thread, off the event loop, and then swapped
in at once on the loop; the entry it replaces is retired: requests that already hold it finish on it, and its batcher
stops when the last one has. An export that fails to load leaves what was served serving, and says so in one warning
line, in ``/readyz`` and in ``serve_model_reload_failures_total``. A removed one answers 404 from then on
(requests in progress finish).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from export.contract import LABELS, MANIFEST, NAME_PATTERN, SECTION, ExportDir
from export.formats import FORMATS
from serve.engine import Batcher
from serve.model import SERVED_FORMAT, OnnxModel
from serve.oip import VERSION
from serve.settings import Settings
from serve.state import Served, ServeState
from transfer.errors import UserError

log = logging.getLogger("serve")

VERSION_FOLDER = re.compile(r"^[0-9]{1,9}$")  # name/1, name/2, ...: numbered versions of one model
MISSING_POLLS = 2  # polls in a row a served export must be missing before it is unloaded (not a swap's instant)
_ERROR_CHARS = 400  # a reload error as /readyz shows it: one line, bounded


@dataclass(frozen=True)
class Found:
    """An export directory found in the repository (not opened): the model and version it serves, and what changes
    when it is replaced."""

    name: str
    version: str
    path: Path
    fingerprint: tuple


def fingerprint(folder: Path) -> tuple:
    """What changes when an export is replaced: the folder's inode (a swapped-in export is a new directory), the
    manifest's sha256 and the inode, size and mtime of labels.txt and of every artifact the manifest lists (whichever
    ``--precision`` serves: model.onnx or its int8 variant). Never raises."""
    parts: list = []
    try:
        parts.append(folder.stat().st_ino)
        raw = (folder / MANIFEST).read_bytes()
    except OSError:
        raw = b""
    parts.append(hashlib.sha256(raw).hexdigest())
    artifacts = []
    try:
        for entry in json.loads(raw)[SECTION]["formats"].values():
            listed = entry.get("file") if isinstance(entry, dict) else None
            if isinstance(listed, str) and listed and listed not in artifacts:
                artifacts.append(listed)
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    for name in (LABELS, *(artifacts or [FORMATS[SERVED_FORMAT].file])):
        try:
            st = (folder / name).stat()
            parts.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
        except (OSError, ValueError):
            parts.append((name, None))
    return tuple(parts)


def scan(repo: Path) -> dict[tuple[str, str], Found]:
    """Every export directory of the repository by (model name, version); folders that are not (yet) exports are
    skipped. Raises OSError only when ``repo`` itself cannot be listed."""
    found: dict[tuple[str, str], Found] = {}
    for folder in sorted(repo.iterdir()):
        try:
            if folder.name.startswith(".") or not folder.is_dir():
                continue  # the exporter's staging directories, hidden files
            if (folder / MANIFEST).is_file():
                found[folder.name, VERSION] = Found(folder.name, VERSION, folder, fingerprint(folder))
                continue
            for sub in sorted(folder.iterdir()):
                if VERSION_FOLDER.match(sub.name) and sub.is_dir() and (sub / MANIFEST).is_file():
                    version = str(int(sub.name))
                    found[folder.name, version] = Found(folder.name, version, sub, fingerprint(sub))
        except OSError:
            continue  # removed while listed, unreadable: as if absent
    return found


def discover(export_dirs: tuple[str, ...], model_repo: str | None) -> list[tuple[Found, ExportDir]]:
    """The exports to serve at start, opened (any unusable one is a one-line UserError): the given directories
    (version 1 each) plus every export directory of ``model_repo``."""
    exports = []
    for p in export_dirs:
        export = ExportDir.open(p)
        exports.append((Found(export.name, VERSION, Path(p), fingerprint(Path(p))), export))
    if model_repo:
        repo = Path(model_repo)
        if not repo.is_dir():
            raise UserError(f"--model-repo {repo} is not a directory")
        found = scan(repo)
        if not found:
            raise UserError(f"--model-repo {repo} holds no export directories (folders with {MANIFEST}, or "
                            f"numbered version folders with one)")
        for item in found.values():
            if not NAME_PATTERN.match(item.name):
                raise UserError(f"model name {item.name!r} ({item.path}) is not usable in URLs; use letters, "
                                "digits, '.', '_', '-'")
            exports.append((item, ExportDir.open(item.path, item.name)))
    names = [found.name for found, _ in exports]
    static = [found.name for found, _ in exports[:len(export_dirs)]]
    duplicates = sorted({n for n in static if names.count(n) > 1})
    if duplicates:
        raise UserError(f"two exports share the name {', '.join(duplicates)}; serve them from different folder names")
    return exports


def open_model(export: ExportDir, settings: Settings) -> OnnxModel:
    """``export``'s ONNX model opened for serving (sha256 checked) and warmed up; blocking, for a thread."""
    threads, _ = settings.parallelism()
    model = OnnxModel(export, threads, settings.precision)
    if settings.warmup:
        model.warm_up(tuple(sorted({1, settings.max_batch})))
    return model


async def start_batcher(model: OnnxModel, settings: Settings, metrics) -> Batcher:
    """A started batcher for ``model`` with the server's batching settings."""
    _, streams = settings.parallelism()
    batcher = Batcher(model, settings.max_batch, settings.batch_timeout_ms / 1000, metrics,
                      settings.max_queue_images, streams)
    await batcher.start()
    return batcher


def _prepare(item: Found, current: Served | None, settings: Settings) -> tuple[OnnxModel, str] | None:
    """The model of ``item`` opened and warmed up, with its manifest's sha256; None when it is the very export
    ``current`` serves (same manifest, same artifact: nothing to reload). Blocking, for a thread.

    Manifest, labels and model come from one consistent read: the manifest is read once (its classes and the
    artifact's sha256 with it), the artifact's bytes are read once and checked against that sha256, ONNX Runtime
    is given those bytes, and the manifest is read again afterwards (ExportDir.read_artifact): an export rewritten
    in place meanwhile is refused for this poll (the one served keeps serving) and tried again at the next."""
    export = ExportDir.open(item.path, item.name)
    if current is not None and current.manifest_sha256 == export.manifest_sha256:
        artifact = export.read_artifact(current.model.format)  # raises when the file no longer matches it
        if artifact.sha256 == current.model.sha256:
            return None
    return open_model(export, settings), export.manifest_sha256


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_CHARS else text[:_ERROR_CHARS - 3] + "..."


class RepoWatcher:
    """Polls the model repository of ``state`` and applies what changed; ``run`` is the background task."""

    def __init__(self, state: ServeState, repo: Path, known: dict[tuple[str, str], tuple],
                 static_names: set[str]) -> None:
        self.state, self.repo, self.static_names = state, repo, static_names
        self.interval = state.settings.repo_poll_s
        self.seen = dict(known)  # (name, version) -> the fingerprint last acted on (loaded or failed)
        self.missing: dict[tuple[str, str], int] = {}  # served keys not found, polls in a row
        self.retiring: set[asyncio.Task] = set()
        self._unlisted = False  # the repository could not be listed at the last poll (warned once)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # a poll never kills the watcher
                log.exception("model repository %s: poll failed", self.repo)

    async def poll(self) -> None:
        """One look at the repository: load what is new or changed, unload what has gone."""
        try:
            found = await asyncio.to_thread(scan, self.repo)
        except OSError as exc:
            if not self._unlisted:
                log.warning("model repository %s cannot be listed (%s); serving what is loaded", self.repo, exc)
            self._unlisted = True
            return
        self._unlisted = False
        for key, item in found.items():
            self.missing.pop(key, None)
            if self.seen.get(key) != item.fingerprint:
                self.seen[key] = item.fingerprint
                await self._load(item)
        for key in [k for k in self.seen if k not in found]:
            name, version = key
            if name in self.state.versions and version in self.state.versions[name]:
                self.missing[key] = self.missing.get(key, 0) + 1
                if self.missing[key] < MISSING_POLLS:
                    continue
            del self.seen[key]
            self.missing.pop(key, None)
            self.state.reload_errors.pop(key, None)
            old = self.state.drop(name, version)
            if old is not None:
                log.info("unloaded %s version %s: its export left %s", name, version, self.repo)
                self._retire(old)

    async def _load(self, item: Found) -> None:
        state, key = self.state, (item.name, item.version)
        current = state.versions.get(item.name, {}).get(item.version)
        try:
            if item.name in self.static_names:
                raise UserError(f"a model named {item.name!r} is already served from an EXPORT_DIR")
            prepared = await asyncio.to_thread(_prepare, item, current, state.settings)
        except Exception as exc:  # UserError, ONNX Runtime's errors, OSError: the old export keeps serving
            self._failed(item, exc, current is not None)
            if await asyncio.to_thread(fingerprint, item.path) != item.fingerprint:
                self.seen.pop(key, None)  # it changed while it was read (rewritten in place): try it again next poll
            return
        state.reload_errors.pop(key, None)
        if prepared is None:
            return
        model, manifest_sha256 = prepared
        entry = Served(model, await start_batcher(model, state.settings, state.metrics), item.version,
                       manifest_sha256)
        old = state.put(item.name, entry)
        state.metrics.reloads.labels(item.name).inc()
        log.info("%s %s version %s from %s (sha256 %s)", "replaced" if old else "loaded", item.name, item.version,
                 item.path, model.sha256[:12])
        if old is not None:
            self._retire(old)

    def _failed(self, item: Found, exc: Exception, serving: bool) -> None:
        message = _one_line(str(exc) or type(exc).__name__)
        shown = message
        for prefix in {str(self.repo.resolve()), str(self.repo)}:  # /readyz is open: no server paths in it
            shown = shown.replace(prefix + os.sep, "")
        self.state.reload_errors[item.name, item.version] = shown
        self.state.metrics.reload_failures.labels(item.name).inc()
        log.warning("model repository: %s version %s from %s not loaded (%s): %s", item.name, item.version, item.path,
                    "the previous export keeps serving" if serving else "not served", message)

    def _retire(self, entry: Served) -> None:
        task = asyncio.create_task(entry.retire(), name=f"retire-{entry.model.name}")
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    async def close(self) -> None:
        """Stop retiring entries at once (the server is stopping; their requests have ended)."""
        for task in list(self.retiring):
            task.cancel()
        await asyncio.gather(*self.retiring, return_exceptions=True)
