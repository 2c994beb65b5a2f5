"""In-graph preprocessing from Keras' own layers, and the custom layers that cannot be avoided.

A model built here is self-contained: ``keras.saving.load_model("model.keras")`` works in a Python that never
imported this project, because preprocessing is made of built-in layers (:func:`preprocessing_layer`). Two custom
layers remain registered under the ``transfer>`` package:

- :class:`HubFeatureExtractor` wraps a TF Hub module (there is no built-in Keras 3 layer for one); ``model.keras``
  embeds the module, and a model with one loads through :func:`transfer.runmodel.load_run_model` (which checks it).
- :class:`Preprocess` is kept only so that run directories written before preprocessing moved to built-in layers
  still load; nothing builds it any more.
"""

from __future__ import annotations

import contextvars
import os
import re
import shutil
from pathlib import Path

import keras
import numpy as np
from keras import ops

from transfer.backbones import PREPROCESSING  # the table (it used to live here; still importable from here)
from transfer.errors import UserError


def preprocessing_layer(mode: str, name: str = "preprocess") -> keras.layers.Layer:
    """A built-in Keras layer mapping raw 0..255 RGB pixels to what a backbone expects (``PREPROCESSING[mode]``).

    ``x * scale + offset`` per channel is a ``Rescaling`` layer; the channel flip of ``caffe`` (RGB -> BGR) is a 1x1
    ``Conv2D`` with the permutation matrix (folded with the scale) as its frozen kernel and the offset as its bias,
    so it computes exactly ``x[..., ::-1] * scale + offset``. ``none`` is an ``Identity``.
    """
    if mode not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing mode {mode!r}")
    bgr, scale, offset, _ = PREPROCESSING[mode]
    if bgr:
        kernel = np.zeros((1, 1, 3, 3), np.float32)
        for out_channel in range(3):  # output channel k reads input channel 2 - k
            kernel[0, 0, 2 - out_channel, out_channel] = scale[out_channel]
        layer = keras.layers.Conv2D(3, 1, name=name, trainable=False, kernel_initializer="zeros")
        layer.build((None, None, None, 3))
        layer.set_weights([kernel, np.asarray(offset, np.float32)])
        return layer
    if mode == "none":
        return keras.layers.Identity(name=name)
    return keras.layers.Rescaling(scale=list(scale), offset=list(offset), name=name)


@keras.saving.register_keras_serializable(package="transfer")
class Preprocess(keras.layers.Layer):
    """Legacy: the custom preprocessing layer of older run directories, kept registered only so they still load.

    New models use :func:`preprocessing_layer` (built-in Keras layers, loadable without this project).
    """

    def __init__(self, mode: str = "none", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING:
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode
        self._bgr, scale, offset, _ = PREPROCESSING[mode]
        self._scale = tuple(scale)
        self._offset = tuple(offset)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self._bgr:
            x = ops.flip(x, axis=-1)
        if self.mode == "none":
            return x
        return x * ops.convert_to_tensor(self._scale, x.dtype) + ops.convert_to_tensor(
            self._offset, x.dtype
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


_KAGGLE_HANDLE = re.compile(r"^[\w.-]+/[\w.-]+/[\w.-]+/[\w.-]+(/\d+)?$")
HUB_PINS = "hub_pins.json"  # in keras_home(): URL -> sha256 of the module as first fetched
MODULE_ASSET = "module"  # the Hub SavedModel's folder inside the layer's assets in model.keras
TRUST_FLAG = "--trust-hub-handle"

# Ops a feature extractor has no business running: file system, Python, network, queues, summaries, checkpoints,
# debugging dumps. A module whose callable graph holds one is not loaded from a run without the user's opt-in.
_UNSAFE_OP = re.compile(
    r"File|Reader|Writer|Summary|PyFunc|Rpc|Dataset|Iterator|Checkpoint|Record|Debug|Dump|Collective|Queue|Barrier"
    r"|Print|Table|Stage|Infeed|Outfeed|TPU|Tpu|Remap|Proto|Sharded|ImmutableConst|^Save|^Restore|^_?(Host)?(Send|Recv)"
)


def resolve_hub_handle(handle: str) -> str:
    """A local SavedModel dir stays a path; a bare Kaggle handle becomes a Kaggle URL."""
    if os.path.isdir(os.path.expanduser(handle)):
        return str(Path(handle).expanduser().resolve())
    if "://" in handle:
        return handle
    if _KAGGLE_HANDLE.match(handle):
        return "https://www.kaggle.com/models/" + handle
    raise UserError(
        f"hub handle '{handle}' is neither an existing SavedModel directory, a URL nor a Kaggle "
        "handle (owner/model/framework/variation[/version])"
    )


def hub_module_dir(handle: str) -> Path:
    """The local directory of ``handle``'s SavedModel: the directory itself, or tensorflow_hub's cached download.

    A module fetched from the network is pinned: the sha256 of its first download is recorded in
    ``keras_home()/hub_pins.json``, and a later use whose cached copy differs is refused.
    """
    resolved = resolve_hub_handle(handle)
    if os.path.isdir(resolved):
        return Path(resolved)
    import tensorflow as tf
    import tensorflow_hub as hub

    try:
        local = Path(hub.resolve(resolved))
    except (OSError, ValueError, tf.errors.OpError) as exc:
        raise UserError(
            f"cannot download hub model '{resolved}' (offline?); download it on a connected "
            "machine and pass hub:/path/to/saved_model_dir"
        ) from exc
    _check_pin(resolved, local)
    return local


def _check_pin(url: str, local: Path) -> None:
    import json

    from export.contract import sha256_of
    from transfer.backbones import keras_home

    pins_file = keras_home() / HUB_PINS
    try:
        pins = json.loads(pins_file.read_text())
    except FileNotFoundError:
        pins = {}
    except (OSError, ValueError) as exc:
        raise UserError(f"{pins_file} is unreadable ({exc}); fix or remove it (it pins downloaded hub modules)") \
            from exc
    digest = sha256_of(local)
    pinned = pins.get(url)
    if pinned is None:
        from transfer import rundir

        rundir.write_json(pins_file, {**pins, url: digest})
    elif pinned != digest:
        raise UserError(
            f"hub model '{url}' changed since it was first fetched (cached copy {local} has sha256 {digest[:12]}, "
            f"pinned {pinned[:12]} in {pins_file}); remove the cached copy to fetch it again, or remove its pin "
            "if the change is expected"
        )


def _load_module(path: Path, handle: str):
    """``hub.load`` of a local SavedModel directory with a one-line error for non-Hub directories."""
    import tensorflow as tf
    import tensorflow_hub as hub

    try:
        return hub.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as exc:
        raise UserError(
            f"cannot load '{handle}' as a TF Hub SavedModel ({type(exc).__name__}); "
            "pass a directory written by tf.saved_model.save with a callable __call__"
        ) from exc


def unsafe_ops(saved_model_dir: str | os.PathLike) -> set[str]:
    """The ops of a SavedModel that touch files, Python, the network or queues (``_UNSAFE_OP``), anywhere loading or
    calling it could run them: the functions ``tf.saved_model.load`` restores (and their gradients), the graph's
    own nodes and what they call. The checkpoint saver's functions may save and restore, nothing else. A graph that
    cannot be read, or a TF1-format one (no object graph: loading runs its init ops), is ``{"<...>"}``."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    folder = Path(saved_model_dir)
    model = saved_model_pb2.SavedModel()
    try:
        if (folder / "saved_model.pb").is_file():
            model.ParseFromString((folder / "saved_model.pb").read_bytes())
        else:
            text_format.Parse((folder / "saved_model.pbtxt").read_text(), model)
    except Exception:  # any parse failure: a graph we cannot inspect is not trusted
        return {"<unreadable graph>"}
    found: set[str] = set()
    for meta in model.meta_graphs:
        if not meta.object_graph_def.nodes:
            found.add("<TF1-format graph>")
            continue
        library = {f.signature.name: f for f in meta.graph_def.library.function}
        saver = {meta.saver_def.save_tensor_name.split(":")[0], meta.saver_def.restore_op_name.split(":")[0]}
        top = [n for n in meta.graph_def.node if n.name not in saver]
        roots = list(meta.object_graph_def.concrete_functions)
        roots += [g.gradient_func for g in meta.graph_def.library.gradient]
        roots += [g.registered_op_type for g in meta.graph_def.library.registered_gradients]
        _scan(top, roots, library, set(), found)
        _scan([n for n in meta.graph_def.node if n.name in saver], [], library, _SAVER_OPS, found)
    return found


_SAVER_OPS = frozenset({"SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename"})


def _scan(nodes, roots: list[str], library: dict, allowed: frozenset | set, found: set[str]) -> None:
    """Add to ``found`` the unsafe ops (other than ``allowed``) of ``nodes`` and of every library function they or
    ``roots`` reach (by op name or through a function-valued attribute)."""
    pending, seen = list(roots), set()

    def visit(node_defs):
        for node in node_defs:
            if node.op in library:
                pending.append(node.op)
            elif _UNSAFE_OP.search(node.op) and node.op not in allowed:
                found.add(node.op)
            for attr in node.attr.values():
                if attr.HasField("func"):
                    pending.append(attr.func.name)
                pending.extend(f.name for f in attr.list.func)

    visit(nodes)
    while pending:
        name = pending.pop()
        if name in seen or name not in library:
            continue
        seen.add(name)
        visit(library[name].node_def)


class _LoadPolicy:
    """What :class:`HubFeatureExtractor` may load while :func:`transfer.runmodel.load_run_model` deserializes a
    model: the embedded modules it checked (sha256 -> extracted folder), and whether the user trusts handles."""

    def __init__(self, modules: dict[str, Path], trust_handles: bool, source: str):
        self.modules = modules
        self.trust_handles = trust_handles
        self.source = source


LOAD_POLICY: contextvars.ContextVar[_LoadPolicy | None] = contextvars.ContextVar("hub_load_policy", default=None)


@keras.saving.register_keras_serializable(package="transfer")
class HubFeatureExtractor(keras.layers.Layer):
    """A TF Hub image feature-vector SavedModel wrapped as a Keras 3 layer.

    ``tensorflow_hub.KerasLayer`` is a tf_keras layer and cannot join a Keras 3 model; this layer
    loads the module with ``hub.load`` and tracks its variables as Keras variables, so ``trainable=True``
    fine-tunes them and ``model.keras`` saves them. The module always runs in inference mode so its BatchNorm
    statistics never move.

    Saving embeds the module itself: ``model.keras`` holds a copy of the SavedModel folder among the layer's assets
    and its sha256 (``module_sha256``) in the layer config, so a run directory never depends on the handle it was
    trained from. Loading goes through :func:`transfer.runmodel.load_run_model`, which loads only that embedded
    copy (hash checked, graph checked by :func:`unsafe_ops`); the handle is loaded only when the user opts in
    (``--trust-hub-handle``). A plain ``keras.saving.load_model`` of such a model is refused.
    """

    def __init__(self, handle: str, output_dim: int | None = None, module_sha256: str | None = None, *,
                 source: str | os.PathLike | None = None, **kwargs):
        super().__init__(**kwargs)
        self.handle = handle
        self._module_dir = Path(source) if source is not None else hub_module_dir(handle)
        if module_sha256 is None:
            from export.contract import sha256_of

            module_sha256 = sha256_of(self._module_dir)
        self.module_sha256 = module_sha256
        self._module = _load_module(self._module_dir, handle)
        if not callable(self._module):
            raise UserError(f"hub model '{handle}' is not callable; it must be an image feature-vector model")
        self._has_training_arg = _accepts_training(self._module)
        seen = set()
        for variable in _module_variables(self._module):
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            self._track_variable(
                keras.Variable(
                    initializer=variable,
                    trainable=variable.trainable,
                    dtype=variable.dtype,
                    shape=variable.shape,
                    name=variable.name.replace("/", "_").replace(":", "_"),
                )
            )
        self.output_dim = output_dim
        self.built = True

    @classmethod
    def from_config(cls, config):
        """Deserialization: only the module copy :func:`transfer.runmodel.load_run_model` checked, or the handle
        when the user trusts it; anything else is refused before a graph is loaded."""
        policy = LOAD_POLICY.get()
        config = dict(config)
        digest = config.get("module_sha256")
        handle = config.get("handle")
        if policy is not None and digest in policy.modules:
            return cls(**config, source=policy.modules[digest])
        if policy is not None and policy.trust_handles:
            return cls(**config)
        if policy is None:
            raise UserError(f"a model with a hub layer ({handle!r}) loads only through "
                            "transfer.runmodel.load_run_model, which checks the module it embeds")
        raise UserError(f"{policy.source}: hub layer {config.get('name')!r} would load its module from {handle!r}, "
                        f"outside the run directory; pass {TRUST_FLAG} if you trust that module")

    def call(self, inputs):
        outputs = self._module(inputs, training=False) if self._has_training_arg else self._module(inputs)
        if isinstance(outputs, dict):
            outputs = outputs.get("default", next(iter(outputs.values())))
        return outputs

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        return {**super().get_config(), "handle": self.handle, "output_dim": self.output_dim,
                "module_sha256": self.module_sha256}

    def save_assets(self, dir_path):
        """Embed the module's SavedModel folder in ``model.keras`` (loaded from there, see the class docstring)."""
        shutil.copytree(self._module_dir, Path(dir_path) / MODULE_ASSET, dirs_exist_ok=True)


def _module_variables(module) -> list:
    """The module's variables: its ``variables`` attribute (reusable SavedModel API), else those its
    restored ``__call__`` functions capture."""
    variables = list(getattr(module, "variables", None) or [])
    if variables:
        return variables
    for concrete in getattr(module.__call__, "concrete_functions", []):
        variables.extend(concrete.variables)
    return variables


def _accepts_training(module) -> bool:
    import inspect

    call = module.__call__
    spec = getattr(call, "function_spec", None)
    try:
        params = (
            spec.fullargspec.args + spec.fullargspec.kwonlyargs
            if spec is not None
            else list(inspect.signature(call).parameters)
        )
    except (TypeError, ValueError, AttributeError):
        return False
    return "training" in params
