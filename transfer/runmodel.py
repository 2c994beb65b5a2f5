"""The one loader of a run's ``model.keras``: a run directory is data, never code from elsewhere.

Every command that loads a trained model (export, verify, evaluate, compare's latency) calls
:func:`load_run_model`. It keeps Keras' ``safe_mode`` on (a Lambda or any other unsafe layer is refused), imports
keras_hub when the model holds a keras-hub backbone (a registered Keras class whose config and weights are in
``model.keras``: nothing outside the run is read), and checks every Hub layer before Keras builds it: the layer must
load the module copy embedded in ``model.keras`` (see :class:`transfer.layers.HubFeatureExtractor`) whose sha256
matches the layer config, and that module's graph must hold no file, Python or network ops
(:func:`transfer.layers.unsafe_ops`). Anything else is a one-line :class:`UserError` unless the caller passes
``trust_hub=True`` (the commands' ``--trust-hub-handle``).

TensorFlow is imported only when a model is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
import zipfile
from pathlib import Path

from transfer import rundir
from transfer.errors import UserError

HUB_CLASS = "HubFeatureExtractor"
# an archive member may expand at most this much (a zip bomb would fill the disk when the modules are extracted)
_MAX_EXPANSION = 200
_ASSETS = "assets/"


def load_run_model(run_dir: str | os.PathLike, *, trust_hub: bool = False, compile: bool = False):
    """The Keras model of ``run_dir`` (``RUN/model.keras``), loaded with ``safe_mode`` on.

    Refused with a one-line :class:`UserError`, before any graph is loaded: a missing or unreadable file, an unsafe
    layer (Lambda, unknown classes), a Hub layer whose module is not embedded or differs from its recorded sha256,
    and an embedded module whose graph runs file/Python/network ops. ``trust_hub`` lets a Hub layer load its
    recorded handle (runs written before modules were embedded) and accepts those ops. ``compile`` restores the
    training configuration (optimizer state included); predicting, evaluating and exporting need none.
    """
    path = Path(run_dir) / rundir.MODEL
    if not path.is_file():
        raise UserError(f"{path} does not exist; the run directory has no trained model (re-run its training)")
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
            hub_layers = list(_hub_layers(config))
            modules = _extract_modules(archive, path) if hub_layers else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path} is not a readable Keras model archive ({_first_line(exc)})") from exc
    if any(_keras_hub_objects(config)):  # a keras-hub backbone: its registered classes come with the package
        from transfer.backbones import KERAS_HUB_INSTALL

        try:
            import keras_hub  # noqa: F401 - registers keras_hub's serializable classes
        except ImportError as exc:
            raise UserError(f"{path} holds a keras-hub backbone and keras-hub is not installed here; "
                            f"{KERAS_HUB_INSTALL}") from exc
    from transfer.layers import LOAD_POLICY, TRUST_FLAG, _LoadPolicy

    checked = {}
    try:
        if modules is not None:
            checked = _check_hub_layers(hub_layers, modules, path, trust_hub, TRUST_FLAG)
        import keras

        token = LOAD_POLICY.set(_LoadPolicy(checked, trust_hub, str(path)))
        try:
            model = keras.saving.load_model(path, compile=compile, safe_mode=True)
        except UserError:
            raise
        except Exception as exc:  # Keras raises ValueError/TypeError/... for unsafe or broken configs: one line
            raise UserError(f"{path} cannot be loaded safely ({_first_line(exc)}); a run directory's model.keras "
                            "may hold only built-in Keras layers and this project's registered ones") from exc
        finally:
            LOAD_POLICY.reset(token)
    except BaseException:
        if modules is not None:
            shutil.rmtree(modules.root, ignore_errors=True)
        raise
    if modules is not None:  # the loaded layers keep their folders (a re-save embeds them again) while it lives
        weakref.finalize(model, shutil.rmtree, str(modules.root), True)
    from transfer.precision import to_float32

    to_float32(model)  # what is evaluated, exported and verified computes in float32, whatever the file says
    return model


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _hub_layers(config):
    """Every Hub layer config anywhere in a Keras model config (nested models included)."""
    if isinstance(config, dict):
        if config.get("class_name") == HUB_CLASS or str(config.get("registered_name", "")).endswith(">" + HUB_CLASS):
            yield config.get("config") or {}
        for value in config.values():
            yield from _hub_layers(value)
    elif isinstance(config, list):
        for value in config:
            yield from _hub_layers(value)


def _keras_hub_objects(config):
    """Every keras_hub class a Keras model config names (a keras-hub backbone, nested anywhere)."""
    if isinstance(config, dict):
        if str(config.get("registered_name") or "").startswith("keras_hub>") \
                or str(config.get("module") or "").startswith("keras_hub"):
            yield config.get("class_name")
        for value in config.values():
            yield from _keras_hub_objects(value)
    elif isinstance(config, list):
        for value in config:
            yield from _keras_hub_objects(value)


class _Modules:
    """Embedded Hub SavedModel folders extracted from an archive: sha256 -> folder, under ``root``."""

    def __init__(self, root: Path, by_digest: dict[str, Path]):
        self.root = root
        self.by_digest = by_digest


def _extract_modules(archive: zipfile.ZipFile, path: Path) -> _Modules:
    from export.contract import sha256_of
    from transfer.layers import MODULE_ASSET

    members = [m for m in archive.infolist() if m.filename.startswith(_ASSETS) and not m.is_dir()]
    for member in members:
        if member.file_size > (1 << 28) and member.file_size > _MAX_EXPANSION * max(member.compress_size, 1):
            raise ValueError(f"archive member {member.filename} expands {member.file_size} bytes from "
                             f"{member.compress_size}: refused")
    root = Path(tempfile.mkdtemp(prefix="transfer-hub-"))
    try:
        for member in members:
            archive.extract(member, root)  # zipfile strips absolute paths and '..' from member names
        by_digest = {}
        for pb in sorted((root / "assets").rglob("saved_model.pb*")):
            folder = pb.parent
            if folder.name == MODULE_ASSET and folder not in by_digest.values():
                by_digest[sha256_of(folder)] = folder
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return _Modules(root, by_digest)


def _check_hub_layers(layers: list[dict], modules: _Modules, path: Path, trust: bool, flag: str) -> dict[str, Path]:
    """sha256 -> folder of the embedded modules the Hub layers may load; refuses what they may not."""
    from transfer.layers import unsafe_ops

    allowed = {}
    for layer in layers:
        name, handle, digest = layer.get("name"), layer.get("handle"), layer.get("module_sha256")
        folder = modules.by_digest.get(digest) if isinstance(digest, str) else None
        if folder is None:
            if trust:
                continue  # the layer loads its handle, as the user asked
            why = ("embeds no copy of its module" if not modules.by_digest or not digest
                   else "embeds a module whose sha256 differs from the one recorded")
            raise UserError(f"{path}: hub layer {name!r} {why}, so it would load {handle!r} from outside the run "
                            f"directory; pass {flag} if you trust that module (or retrain the run)")
        ops = unsafe_ops(folder)
        if ops and not trust:
            raise UserError(f"{path}: the hub module embedded for layer {name!r} runs ops that reach outside the "
                            f"model ({', '.join(sorted(ops)[:5])}); pass {flag} if you trust it")
        allowed[digest] = folder
    return allowed
