"""Backbone registry: Keras Applications, TF Hub feature-vector models and keras-hub presets, objects that build and
unfreeze themselves.

Every backbone kind answers the same questions, so nothing else branches on the kind:

- ``resolve_size(requested)``: the image size it sees (its default, checked against its minimum), the one place that
  decides it; ``check_weights(weights)`` and ``check_unfreeze(unfreeze)``: cheap checks before any TensorFlow work
- ``build(size, weights)``: the Keras layer; ``pretrained(weights)``: whether its BatchNorm statistics must stay put
- ``resolve_unfreeze(layer, unfreeze)``: the ``--unfreeze`` value as this backbone honours it (``blocks:N`` as a layer
  count); ``set_trainable(layer, unfreeze, freeze_bn)``: apply it, returning the trainable weight-bearing layers
- ``weights_cached(size)``: whether ImageNet weights are already on disk (None where that does not apply)
- ``facts(layer)``: what the run manifest records about the built layer beyond the common facts
- ``preprocess()``: the in-graph layer mapping raw 0..255 RGB to what it was trained on

A new kind is one class with these methods and one row of :data:`KINDS`. Nothing here imports TensorFlow or Keras at
import time; ``build`` and ``set_trainable`` import them when called.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transfer import rundir
from transfer.errors import UserError, unknown
from transfer.freezing import Unfreeze, resolve_layer_count, set_layers_trainable

HUB_PREFIX = "hub:"
HUB_LAYER = "hub_backbone"  # the Hub layer's name inside a model
KERAS_HUB_PREFIX = "keras_hub:"
KERAS_HUB_PACKAGE = "keras-hub"
KERAS_HUB_INSTALL = 'pip install -e ".[keras-hub]"'
KERAS_HUB_HANDLE = "keras_hub:<preset name (resnet_50_imagenet) | kaggle://... | hf://... | local preset dir>"
SCRATCH_BN_MOMENTUM = 0.5

# Per-channel affine maps from raw 0..255 RGB to what each backbone family was trained on.
# Every mode is ``x[..., order] * scale + offset``; transfer.layers.preprocessing_layer builds it from Keras' own
# layers. mode: (reverse channels to BGR, scale per channel, offset per channel, description)
_IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
PREPROCESSING = {
    "caffe": (True, (1.0, 1.0, 1.0), tuple(-m for m in _IMAGENET_BGR_MEAN),
              "RGB->BGR, minus ImageNet mean (VGG/ResNet)"),
    "tf": (False, (1 / 127.5,) * 3, (-1.0,) * 3, "scale to [-1, 1]"),
    "torch": (False, tuple(1 / (255 * s) for s in _TORCH_STD),
              tuple(-m / s for m, s in zip(_TORCH_MEAN, _TORCH_STD, strict=True)),
              "scale to [0, 1], ImageNet mean/std"),
    "unit": (False, (1 / 255,) * 3, (0.0,) * 3, "scale to [0, 1]"),
    "lite": (False, (1 / 128,) * 3, (-127 / 128,) * 3, "(x - 127) / 128 (EfficientNet-Lite)"),
    "none": (False, (1.0,) * 3, (0.0,) * 3, "raw 0..255 (backbone scales internally)"),
}


_GENERIC_HANDLE_PARTS = {"feature_vector", "feature-vector", "classification", "tensorflow2", "tf2", "models"}


def short_name(name: str) -> str:
    """How people read a backbone's name: a Hub handle by its last meaningful part (``hub:.../mobilenet_v2_100_224/
    feature_vector/5`` -> ``mobilenet_v2_100_224-feature_vector``), a registry name as it is."""
    prefix = next((p for p in (HUB_PREFIX, KERAS_HUB_PREFIX) if name.startswith(p)), None)
    if prefix is None:
        return name
    parts = [p for p in name[len(prefix):].replace("\\", "/").split("/") if p and not p.isdecimal()]
    if not parts:
        return prefix[:-1]
    if parts[-1].lower() in _GENERIC_HANDLE_PARTS and len(parts) > 1:
        return f"{parts[-2]}-{parts[-1]}"
    return parts[-1]


def weights_run(weights: str) -> Path | None:
    """The run directory ``--weights`` names (the run itself or its model.keras), or None when it names no run."""
    if weights in ("imagenet", "none"):
        return None
    path = Path(weights).expanduser()
    if path.is_dir() and (path / rundir.CONFIG).is_file():
        return path
    if path.is_file() and path.name == rundir.MODEL and (path.parent / rundir.CONFIG).is_file():
        return path.parent
    return None


def check_run_backbone(weights: str, run: Path, name: str) -> None:
    """``--weights RUN``: a complete run whose backbone is ``name``, else a one-line UserError naming the way out."""
    source = rundir.load_complete(run).get("model", {}).get("backbone")
    if source != name:
        raise UserError(f"--weights '{weights}' is a run of {source or 'a scratch baseline (no backbone)'}, not "
                        f"{name}; pass a run of {name}" + (f" or --backbone {source}" if source else ""))


def copy_run_backbone(layer, run: Path, name: str) -> None:
    """Give the freshly built backbone ``layer`` the weights of ``run``'s backbone (same architecture, any input
    size), or a one-line UserError when they do not fit."""
    from transfer.runmodel import load_run_model

    manifest = rundir.load_complete(run)
    source = load_run_model(run).get_layer(manifest["model"]["backbone_layer"])
    try:
        layer.set_weights(source.get_weights())
    except ValueError as exc:
        raise UserError(f"--weights '{run}': its {name} backbone does not fit this one "
                        f"({str(exc).splitlines()[0][:120]})") from exc


def keras_home() -> Path:
    """Where Keras caches downloads (``KERAS_HOME`` or ``~/.keras``)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


class _Sized:
    """The image-size rule every kind shares: the default when none is asked for, never below the minimum."""

    name: str
    default_size: int
    min_size: int

    def resolve_size(self, requested: int | None) -> int:
        """The size this backbone sees: ``requested``, or its default when None; refuses one below its minimum."""
        size = self.default_size if requested is None else int(requested)
        if size < self.min_size:
            raise UserError(
                f"--image-size {size} is below {self.name}'s minimum of {self.min_size}; "
                f"use --image-size {self.min_size} or more (default {self.default_size})"
            )
        return size

    def preprocess(self):
        """The built-in Keras layer mapping raw 0..255 RGB to this backbone's input (``PREPROCESSING[preprocessing]``,
        see :func:`transfer.layers.preprocessing_layer`)."""
        from transfer.layers import preprocessing_layer

        return preprocessing_layer(self.preprocessing)


@dataclass(frozen=True)
class Backbone(_Sized):
    """A Keras Applications model: one registry row.

    ``preprocessing`` names the in-graph scaling of raw 0..255 RGB pixels (a key of :data:`PREPROCESSING`);
    ``block_pattern`` is a regex whose first group names the block a layer belongs to; ``weights_file`` is the name
    Keras caches the ImageNet no-top weights under (``{size}`` is replaced for size-dependent files).
    """

    name: str
    constructor: str
    default_size: int
    min_size: int
    preprocessing: str
    block_pattern: str
    weights_file: str
    params: int
    family: str
    weight_sizes: tuple[int, ...] = ()
    kwargs: dict = field(default_factory=dict)

    def weights_filename(self, size: int) -> str:
        """The Keras cache file name of the ImageNet no-top weights at ``size``."""
        if self.weight_sizes:
            size = size if size in self.weight_sizes else self.default_size
        return self.weights_file.format(size=size)

    def weights_path(self, size: int | None = None) -> Path:
        """Where Keras looks for (and caches) the ImageNet no-top weights."""
        return keras_home() / "models" / self.weights_filename(size or self.default_size)

    def weights_cached(self, size: int | None = None) -> bool:
        return bool(self.weights_file) and self.weights_path(size).exists()

    def weights_here(self) -> list[dict]:
        """Every named ``--weights`` this backbone takes and whether this machine has them: packaged weights
        (installed or not) first, then Keras' ImageNet download (cached or not) where Keras has one."""
        from transfer.pretrained import PRETRAINED_INSTALL, packaged_for

        rows = []
        for row in packaged_for(self.name):
            version = row.version() if row.installed() else None
            rows.append({"weights": row.name, "source": "packaged", "package": row.distribution,
                         "available": version is not None,
                         "status": f"packaged ({row.distribution} {version})" if version
                         else f"not installed ({PRETRAINED_INSTALL})"})
        if self.weights_file and not any(r["weights"] == "imagenet" for r in rows):
            cached = self.weights_cached()
            rows.append({"weights": "imagenet", "source": "keras download", "package": None, "available": cached,
                         "status": "downloaded" if cached else "download"})
        return rows

    def constructor_fn(self):
        """The function building this backbone: ``keras.applications.<constructor>``, or ``module:function``."""
        if ":" in self.constructor:
            import importlib

            module, _, attr = self.constructor.partition(":")
            return getattr(importlib.import_module(module), attr)
        import keras

        return getattr(keras.applications, self.constructor)

    def block_of(self, layer_name: str) -> str | None:
        """The block a layer belongs to, or None for stem/top layers outside any block."""
        match = re.match(self.block_pattern, layer_name)
        return match.group(1) if match else None

    def check_weights(self, weights: str) -> None:
        """``imagenet``, ``none``, an existing weights file, or a complete run of this same backbone (its directory
        or its model.keras): fine-tuning then starts from that run's backbone."""
        from transfer.pretrained import check_name, packaged, packaged_for

        run = weights_run(weights)
        if run is not None:
            check_run_backbone(weights, run, self.name)
            return
        row = packaged(self.name, weights)
        if row is not None:
            row.path()  # installed, or one line naming the install
            return
        check_name(self.name, weights)
        if weights == "imagenet" and not self.weights_file:
            raise UserError(f"{self.name} has no ImageNet weights to download; pass --weights PATH (a weights file) "
                            "or --weights none")
        if weights not in ("imagenet", "none") and not os.path.isfile(weights):
            named = "".join(f", {r.name}" for r in packaged_for(self.name))
            raise UserError(f"--weights '{weights}' is not a file; pass imagenet{named}, none, a weights file or a "
                            "run directory of the same backbone")

    def check_unfreeze(self, unfreeze: Unfreeze) -> None:
        """Every form applies; the layer and block counts are checked against the built layer."""

    def pretrained(self, weights: str) -> bool:
        return weights != "none"

    def build(self, size: int, weights: str):
        """The Keras Applications model without its top, for ``size`` x ``size`` RGB input.

        A backbone trained from scratch gets a fast BatchNorm momentum (see :func:`_speed_up_batchnorm`).
        """
        from transfer.pretrained import packaged

        self.check_weights(weights)
        constructor = self.constructor_fn()
        run = weights_run(weights)
        if run is not None:
            return self._from_run(constructor, size, run)
        row = packaged(self.name, weights)
        if row is not None:  # weights inside an installed package: built empty, then given the file's tensors
            layer = constructor(include_top=False, weights=None, input_shape=(size, size, 3), **self.kwargs)
            row.load(layer)
            return layer
        weights_arg = {"none": None, "imagenet": "imagenet"}.get(weights, weights)
        try:
            layer = constructor(include_top=False, weights=weights_arg, input_shape=(size, size, 3), **self.kwargs)
        except ValueError as exc:
            if weights_arg not in (None, "imagenet"):
                raise UserError(
                    f"--weights '{weights}' does not fit {self.name} (include_top=False): "
                    f"{str(exc).splitlines()[0][:160]}"
                ) from exc
            raise
        except Exception as exc:
            # keras.utils.get_file raises a bare Exception("URL fetch failure on ...") when offline.
            if weights_arg == "imagenet" and "fetch failure" in str(exc):
                from transfer.pretrained import PACKAGED

                here = ", ".join(f"--backbone {r.backbone} --weights {r.name}" for r in PACKAGED if r.installed())
                raise UserError(
                    f"cannot download ImageNet weights for {self.name} (offline?); place "
                    f"{self.weights_filename(size)} at {self.weights_path(size)}, or pass "
                    "--weights PATH (a weights file) or --weights none"
                    + (f"; pretrained weights this machine has: {here}" if here else "")
                ) from exc
            raise
        if not self.pretrained(weights):
            _speed_up_batchnorm(layer)
        return layer

    def _from_run(self, constructor, size: int, run: Path):
        """A fresh backbone holding the weights of an earlier run's backbone (same architecture, any input size)."""
        layer = constructor(include_top=False, weights=None, input_shape=(size, size, 3), **self.kwargs)
        copy_run_backbone(layer, run, self.name)
        return layer

    def facts(self, layer) -> dict:
        """What the run manifest records about the built layer besides the common facts (nothing here)."""
        return {}

    def resolve_unfreeze(self, layer, unfreeze: Unfreeze) -> Unfreeze:
        """``unfreeze`` checked against the layer's depth, ``blocks:N`` turned into the layer count it covers."""
        return resolve_layer_count(layer, unfreeze, self.name, self.block_of)

    def set_trainable(self, layer, unfreeze: Unfreeze, freeze_bn: bool = True) -> list[str]:
        """The top ``unfreeze`` layers train (BatchNorm only when ``freeze_bn`` is off); see
        :func:`transfer.freezing.set_layers_trainable`."""
        return set_layers_trainable(layer, unfreeze, freeze_bn)


@dataclass(frozen=True)
class HubBackbone(_Sized):
    """A TF Hub image feature-vector model: URL, Kaggle handle or local SavedModel directory.

    Its weights live in the module (always pretrained); it trains whole or not at all (``--unfreeze 0`` or
    ``all``). ``model.keras`` embeds the module; models that contain one load through
    ``transfer.runmodel.load_run_model``. A module fetched from a URL is pinned by sha256 (transfer.layers).
    """

    handle: str
    default_size: int = 224
    min_size: int = 1
    preprocessing: str = "unit"
    family: str = "hub"

    @property
    def name(self) -> str:
        return HUB_PREFIX + self.handle

    def weights_cached(self, size: int | None = None) -> None:
        return None  # hub modules are cached by tensorflow_hub, per handle (and pinned, see transfer.layers)

    def block_of(self, layer_name: str) -> str | None:
        return None

    def check_weights(self, weights: str) -> None:
        if weights not in ("imagenet", "none"):
            raise UserError(f"--weights '{weights}' does not apply to hub backbones: their weights live in the module")

    def check_unfreeze(self, unfreeze: Unfreeze) -> None:
        if unfreeze.count not in (0, None) or unfreeze.blocks is not None:
            raise UserError(f"--unfreeze {unfreeze.text} on hub backbone '{self.name}': hub modules take 0 or all")

    def pretrained(self, weights: str) -> bool:
        return True

    def build(self, size: int, weights: str):
        """The module as a :class:`transfer.layers.HubFeatureExtractor`, probed with one ``size`` x ``size`` image."""
        import numpy as np

        from transfer.layers import HubFeatureExtractor

        self.check_weights(weights)
        # the module's graph is float32 whatever the dtype policy (--precision): the head casts its features
        layer = HubFeatureExtractor(self.handle, name=HUB_LAYER, dtype="float32")
        try:
            probe = layer(np.zeros((1, size, size, 3), dtype="float32"))
        except (ValueError, TypeError) as exc:
            raise UserError(
                f"hub model '{self.handle}' does not take {size}x{size} RGB images; pass the size it expects "
                f"with --image-size ({str(exc).splitlines()[0][:120]})"
            ) from exc
        if len(probe.shape) != 2:
            raise UserError(
                f"hub model '{self.handle}' returns shape {tuple(probe.shape)}; need an image feature-vector "
                "model returning (batch, features)"
            )
        layer.output_dim = int(probe.shape[-1])
        from transfer.layers import TRUST_FLAG, unsafe_ops

        ops = unsafe_ops(layer._module_dir)
        if ops:
            print(f"warning: hub model '{self.handle}' runs ops that reach outside the model "
                  f"({', '.join(sorted(ops)[:5])}); exporting or evaluating this run will need {TRUST_FLAG}",
                  file=sys.stderr)
        return layer

    def facts(self, layer) -> dict:
        """The sha256 of the module the run embeds in model.keras (see transfer.layers.HubFeatureExtractor)."""
        return {"hub_module_sha256": layer.module_sha256}

    def resolve_unfreeze(self, layer, unfreeze: Unfreeze) -> Unfreeze:
        self.check_unfreeze(unfreeze)
        return unfreeze

    def set_trainable(self, layer, unfreeze: Unfreeze, freeze_bn: bool = True) -> list[str]:
        """The whole module trains or none of it (its BatchNorm statistics never move: it runs in inference mode)."""
        layer.trainable = not unfreeze.frozen_backbone
        return [] if unfreeze.frozen_backbone else [layer.name]

    @classmethod
    def from_handle(cls, handle: str) -> HubBackbone:
        if not handle:
            raise UserError("empty hub handle; use hub:<url | Kaggle handle | SavedModel dir>")
        return cls(handle=handle)


# keras-hub backbone classes whose layer names mark blocks, as the Keras Applications models of the same family do
# (a residual block of ResNet/DenseNet, an MBConv block of EfficientNet, a VGG block): --unfreeze blocks:N.
KERAS_HUB_BLOCKS = {
    "ResNetBackbone": r"^(stack\d+_block\d+)_",
    "EfficientNetBackbone": r"^(block\d+[a-z])_",
    "VGGBackbone": r"^(block\d+)_",
    "DenseNetBackbone": r"^(stack\d+_block\d+)_",
}
KERAS_HUB_DEFAULT_SIZE = 224
_PRESET_CONFIG = "config.json"
_PRESET_CONVERTER = "image_converter.json"
_PRESET_WEIGHTS = "model.weights.h5"


def keras_hub_version() -> str | None:
    """The installed keras-hub version, or None (read from package metadata: nothing is imported)."""
    from importlib import metadata

    try:
        return metadata.version(KERAS_HUB_PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def import_keras_hub():
    """``import keras_hub``, or a one-line :class:`UserError` saying how to install it."""
    try:
        import keras_hub
    except ImportError as exc:
        raise UserError(f"keras-hub backbones need the keras-hub package, which is not installed here ({exc}); "
                        f"{KERAS_HUB_INSTALL}") from exc
    return keras_hub


def keras_hub_way_out(preset: str) -> str:
    """How to use ``preset`` on a machine that cannot fetch it: a local preset directory saved on a connected one."""
    return (f"""on a connected machine run python -c "import keras_hub as k; p, d = '{preset}', 'DIR'; """
            """k.models.Backbone.from_preset(p).save_to_preset(d); k.layers.ImageConverter.from_preset(p)"""
            """.save_to_preset(d)", copy DIR here and pass --backbone keras_hub:DIR""")


@dataclass(frozen=True)
class KerasHubPreset:
    """What a keras-hub preset says about itself (its JSON files): the backbone config and the image converter's."""

    source: str  # what Backbone.from_preset is given: a resolved local directory or the preset handle
    local: bool
    config: dict  # config.json: the serialized Backbone
    converter: dict  # image_converter.json's "config": image_size, scale, offset, ...

    @property
    def class_name(self) -> str:
        return str(self.config.get("class_name"))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else type(exc).__name__


def _is_local_preset(handle: str) -> bool:
    return "://" not in handle and (os.path.isdir(os.path.expanduser(handle)) or handle.startswith(("/", ".", "~"))
                                   or os.sep in handle or "/" in handle)


_PRESETS: dict[str, KerasHubPreset] = {}


def read_keras_hub_preset(handle: str) -> KerasHubPreset:
    """The preset's config and image converter, read from its JSON files (a remote preset fetches only those two);
    every way it can fail is a one-line :class:`UserError` naming the preset and the way out."""
    if handle in _PRESETS:
        return _PRESETS[handle]
    if _is_local_preset(handle):
        folder = Path(handle).expanduser()
        if not folder.is_dir():
            raise UserError(f"keras-hub preset directory '{handle}' does not exist; pass a directory written by "
                            f"save_to_preset ({keras_hub_way_out('PRESET')})")
        try:
            config = _json_file(folder / _PRESET_CONFIG)
        except (OSError, ValueError) as exc:
            raise UserError(f"'{handle}' is not a keras-hub preset directory (no readable {_PRESET_CONFIG}: "
                            f"{_first_line(exc)}); {keras_hub_way_out('PRESET')}") from exc
        converter = _json_file(folder / _PRESET_CONVERTER) if (folder / _PRESET_CONVERTER).is_file() else None
        preset = _checked_preset(handle, str(folder.resolve()), True, config, converter)
    else:
        import_keras_hub()
        from keras_hub.src.utils.preset_utils import load_json  # reads one file of a preset (fetched if remote)

        try:
            config = load_json(handle, _PRESET_CONFIG)
        except Exception as exc:  # kagglehub/huggingface raise anything from ConnectionError to 404s
            raise UserError(f"keras-hub preset '{handle}' cannot be fetched (unknown preset, or offline: "
                            f"{_first_line(exc)}); {keras_hub_way_out(handle)}") from exc
        try:
            converter = load_json(handle, _PRESET_CONVERTER)
        except FileNotFoundError:
            converter = None
        except Exception as exc:
            raise UserError(f"keras-hub preset '{handle}': its {_PRESET_CONVERTER} cannot be fetched "
                            f"({_first_line(exc)}); {keras_hub_way_out(handle)}") from exc
        preset = _checked_preset(handle, handle, False, config, converter)
    _PRESETS[handle] = preset
    return preset


def _json_file(path: Path) -> dict:
    import json

    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} holds no JSON object")
    return value


def _checked_preset(handle: str, source: str, local: bool, config: dict, converter: dict | None) -> KerasHubPreset:
    registered = str(config.get("registered_name") or "")
    if not (registered.startswith("keras_hub>") and str(config.get("class_name", "")).endswith("Backbone")):
        raise UserError(f"'{handle}' is not a keras-hub backbone preset ({_PRESET_CONFIG} describes "
                        f"{registered or config.get('class_name') or 'no Keras object'}, not a keras_hub Backbone); "
                        f"{keras_hub_way_out('PRESET' if local else handle)}")
    if not isinstance(converter, dict) or not isinstance(converter.get("config"), dict):
        raise UserError(f"keras-hub preset '{handle}' has no {_PRESET_CONVERTER} (the input scaling its weights "
                        f"expect); save one beside the backbone: keras_hub.layers.ImageConverter.from_preset(NAME)"
                        f".save_to_preset(DIR), or keras_hub.layers.ImageConverter(image_size=(S, S), scale=1/255)"
                        f".save_to_preset(DIR) for a backbone of your own")
    return KerasHubPreset(source, local, config, converter["config"])


def _per_channel(value, neutral: float) -> tuple[float, float, float]:
    if value is None:
        return (neutral,) * 3
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = [float(v) for v in value]
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) != 3:
        raise UserError(f"keras-hub image converter scale/offset {value!r} is neither one value nor one per channel")
    return tuple(values)


@dataclass(frozen=True)
class KerasHubBackbone(_Sized):
    """A keras-hub image ``Backbone`` built with ``keras_hub.models.Backbone.from_preset``: a built-in preset name,
    a ``kaggle://`` or ``hf://`` handle, or a local preset directory (written by ``save_to_preset``; works offline).

    The preset decides the default image size and the input scaling (its ``ImageConverter``: ``x * scale + offset``,
    built in-graph as a ``Rescaling`` layer, so artifacts take raw 0..255 RGB like every other). ``--weights
    imagenet`` loads the preset's weights, ``none`` initialises it randomly. It unfreezes by layer count, ``all``, or
    ``blocks:N`` on the classes of :data:`KERAS_HUB_BLOCKS`. ``model.keras`` holds the backbone's config and weights
    (a registered keras_hub class, loaded with safe_mode on; the preset is never needed again).
    """

    handle: str
    min_size: int = 1
    family: str = "keras_hub"

    @property
    def name(self) -> str:
        return KERAS_HUB_PREFIX + self.handle

    def preset(self) -> KerasHubPreset:
        return read_keras_hub_preset(self.handle)

    @property
    def default_size(self) -> int:
        size = self.preset().converter.get("image_size")
        if size:
            return int(size[0])
        shape = self.preset().config.get("config", {}).get("image_shape") or [None]
        return int(shape[0]) if shape[0] else KERAS_HUB_DEFAULT_SIZE

    def scaling(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (scale, offset) of the preset's image converter."""
        converter = self.preset().converter
        return _per_channel(converter.get("scale"), 1.0), _per_channel(converter.get("offset"), 0.0)

    @property
    def preprocessing(self) -> str:
        scale, offset = self.scaling()
        return f"keras_hub preset: x * {_short(scale)} + {_short(offset)}"

    def preprocess(self):
        import keras

        scale, offset = self.scaling()
        if scale == (1.0,) * 3 and offset == (0.0,) * 3:
            return keras.layers.Identity(name="preprocess")
        return keras.layers.Rescaling(scale=list(scale), offset=list(offset), name="preprocess")

    def weights_cached(self, size: int | None = None) -> None:
        return None  # a preset's weights come with it (a local directory, or keras-hub's own download cache)

    def block_of(self, layer_name: str) -> str | None:
        pattern = KERAS_HUB_BLOCKS.get(self.preset().class_name)
        match = re.match(pattern, layer_name) if pattern else None
        return match.group(1) if match else None

    def check_weights(self, weights: str) -> None:
        """``imagenet`` (the preset's own weights), ``none``, or a complete run of this same preset (its directory or
        model.keras): fine-tuning then starts from that run's backbone."""
        run = weights_run(weights)
        if run is not None:
            check_run_backbone(weights, run, self.name)
            return
        if weights not in ("imagenet", "none"):
            raise UserError(f"--weights '{weights}' does not apply to keras-hub backbones: pass imagenet (the "
                            "preset's own weights), none (random initialisation) or a run directory of the same "
                            "preset")

    def check_unfreeze(self, unfreeze: Unfreeze) -> None:
        cls = self.preset().class_name
        if unfreeze.blocks is not None and cls not in KERAS_HUB_BLOCKS:
            works = ", ".join(c.removesuffix("Backbone") for c in KERAS_HUB_BLOCKS)
            raise UserError(f"--unfreeze {unfreeze.text}: keras-hub {cls} has no known blocks (blocks:N works on "
                            f"keras-hub {works}); give a layer count N, 0 or all")

    def pretrained(self, weights: str) -> bool:
        return weights != "none"

    def build(self, size: int, weights: str):
        """``Backbone.from_preset`` for ``size`` x ``size`` RGB input, probed with one image; with a run as
        ``--weights``, built without the preset's weights and given the run's backbone weights."""
        import numpy as np

        self.check_weights(weights)
        run = weights_run(weights)
        preset = self.preset()
        keras_hub = import_keras_hub()
        overrides = {}
        shape = preset.config.get("config", {}).get("image_shape")
        if shape and shape[0] is not None and int(shape[0]) != size:
            overrides["image_shape"] = (size, size, 3)
        load_preset_weights = self.pretrained(weights) and run is None
        if preset.local and load_preset_weights and not (Path(preset.source) / _PRESET_WEIGHTS).is_file():
            raise UserError(f"keras-hub preset '{self.handle}' has no {_PRESET_WEIGHTS}; save the backbone with "
                            "save_to_preset, or pass --weights none to start from random weights")
        try:
            layer = keras_hub.models.Backbone.from_preset(preset.source, load_weights=load_preset_weights,
                                                          **overrides)
        except Exception as exc:  # a download, a weights file or a config that rejects the size
            at = f" at {size}x{size} (its own size is {self.default_size}; try --image-size {self.default_size})" \
                if overrides else ""
            way_out = "" if preset.local else f"; {keras_hub_way_out(self.handle)}"
            raise UserError(f"keras-hub preset '{self.handle}' cannot be built{at}: {_first_line(exc)}{way_out}") \
                from exc
        try:
            probe = layer(np.zeros((1, size, size, 3), dtype="float32"), training=False)
        except Exception as exc:
            raise UserError(f"keras-hub preset '{self.handle}' does not take {size}x{size} RGB images "
                            f"({_first_line(exc)}); try --image-size {self.default_size}") from exc
        if isinstance(probe, dict) or len(probe.shape) not in (2, 3, 4):
            got = sorted(probe) if isinstance(probe, dict) else tuple(probe.shape)
            raise UserError(f"keras-hub preset '{self.handle}' ({preset.class_name}) returns {got}; need an image "
                            "backbone returning a feature map, tokens or a feature vector")
        if run is not None:
            copy_run_backbone(layer, run, self.name)
        elif not self.pretrained(weights):
            _speed_up_batchnorm(layer)
        return layer

    def facts(self, layer) -> dict:
        """The keras-hub class and version, the preset's scaling, and the sha256 of a local preset directory."""
        scale, offset = self.scaling()
        facts = {"keras_hub_class": self.preset().class_name, "keras_hub_version": keras_hub_version(),
                 "keras_hub_scaling": {"scale": list(scale), "offset": list(offset)}}
        if self.preset().local:
            from export.contract import sha256_of

            facts["keras_hub_preset_sha256"] = sha256_of(self.preset().source)
        return facts

    def resolve_unfreeze(self, layer, unfreeze: Unfreeze) -> Unfreeze:
        self.check_unfreeze(unfreeze)
        return resolve_layer_count(layer, unfreeze, self.name, self.block_of)

    def set_trainable(self, layer, unfreeze: Unfreeze, freeze_bn: bool = True) -> list[str]:
        return set_layers_trainable(layer, unfreeze, freeze_bn)

    @classmethod
    def from_handle(cls, handle: str) -> KerasHubBackbone:
        if not handle.strip():
            raise UserError(f"empty keras-hub preset; use {KERAS_HUB_HANDLE}")
        if keras_hub_version() is None:
            raise UserError(f"--backbone keras_hub:{handle} needs the keras-hub package, which is not installed "
                            f"here; {KERAS_HUB_INSTALL}")
        return cls(handle=handle.strip())


def _short(values: tuple[float, ...]) -> str:
    if len(set(values)) == 1:
        return f"{values[0]:.6g}"
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _speed_up_batchnorm(layer) -> None:
    """Let BatchNorm statistics of a from-scratch backbone settle within a few dozen steps.

    Keras Applications use momentum 0.99-0.999, tuned for ImageNet-length training; with it the moving
    statistics of a randomly initialised backbone lag so far behind that validation accuracy sits at
    chance for many epochs.
    """
    import keras

    for sub in layer.layers:
        if isinstance(sub, keras.layers.BatchNormalization):
            sub.momentum = SCRATCH_BN_MOMENTUM


_VGG = r"^(block\d+)_"
_RESNET = r"^(conv\d+_block\d+)_"
_EFFNET = r"^(block\d+[a-z])_"

BACKBONES: dict[str, Backbone] = {
    row.name: row
    for row in (
        Backbone("vgg16", "VGG16", 224, 32, "caffe", _VGG,
                 "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", 14_714_688, "vgg"),
        Backbone("vgg19", "VGG19", 224, 32, "caffe", _VGG,
                 "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", 20_024_384, "vgg"),
        Backbone("resnet50", "ResNet50", 224, 32, "caffe", _RESNET,
                 "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", 23_587_712, "resnet"),
        Backbone("resnet101", "ResNet101", 224, 32, "caffe", _RESNET,
                 "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5", 42_658_176, "resnet"),
        Backbone("resnet50v2", "ResNet50V2", 224, 32, "tf", _RESNET,
                 "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5", 23_564_800, "resnet"),
        Backbone("mobilenet", "MobileNet", 224, 32, "tf", r"^conv_(?:dw_|pw_)?(\d+)",
                 "mobilenet_1_0_{size}_tf_no_top.h5", 3_228_864, "mobilenet",
                 weight_sizes=(128, 160, 192, 224)),
        Backbone("mobilenetv2", "MobileNetV2", 224, 32, "tf", r"^(block_\d+|expanded_conv)_",
                 "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5",
                 2_257_984, "mobilenet", weight_sizes=(96, 128, 160, 192, 224)),
        Backbone("mobilenetv3small", "MobileNetV3Small", 224, 32, "none",
                 r"^(expanded_conv(?:_\d+)?)_",
                 "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", 939_120, "mobilenet"),
        Backbone("mobilenetv3large", "MobileNetV3Large", 224, 32, "none",
                 r"^(expanded_conv(?:_\d+)?)_",
                 "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", 2_996_352, "mobilenet"),
        Backbone("efficientnetb0", "EfficientNetB0", 224, 32, "none", _EFFNET,
                 "efficientnetb0_notop.h5", 4_049_571, "efficientnet"),
        Backbone("efficientnetb1", "EfficientNetB1", 240, 32, "none", _EFFNET,
                 "efficientnetb1_notop.h5", 6_575_239, "efficientnet"),
        Backbone("efficientnetb2", "EfficientNetB2", 260, 32, "none", _EFFNET,
                 "efficientnetb2_notop.h5", 7_768_569, "efficientnet"),
        Backbone("efficientnet_lite0", "transfer.efficientnet_lite:EfficientNetLite0", 224, 32, "lite", _EFFNET,
                 "", 3_413_024, "efficientnet"),
        Backbone("efficientnetv2b0", "EfficientNetV2B0", 224, 32, "none", r"^(block\d+[a-z])_",
                 "efficientnetv2-b0_notop.h5", 5_919_312, "efficientnet"),
        Backbone("densenet121", "DenseNet121", 224, 32, "torch", _RESNET,
                 "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5", 7_037_504, "densenet"),
        Backbone("xception", "Xception", 299, 71, "tf", r"^(block\d+)_",
                 "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", 20_861_480, "xception"),
        Backbone("inceptionv3", "InceptionV3", 299, 75, "tf", r"^(mixed\d+)$",
                 "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", 21_802_784,
                 "inception"),
        Backbone("convnexttiny", "ConvNeXtTiny", 224, 32, "none", r"^convnext_tiny_(stage_\d+)_",
                 "convnext_tiny_notop.h5", 27_820_128, "convnext"),
    )
}

# Backbone kinds named by a prefix: (prefix, how `transfer backbones` shows it, factory taking the rest of the name).
KINDS = ((HUB_PREFIX, "hub:<handle>", HubBackbone.from_handle),
         (KERAS_HUB_PREFIX, "keras_hub:<preset>", KerasHubBackbone.from_handle))


def get_backbone(name: str) -> Backbone | HubBackbone | KerasHubBackbone:
    """Look a backbone up by name; ``hub:HANDLE`` gives a TF Hub backbone, ``keras_hub:PRESET`` a keras-hub one."""
    for prefix, _, make in KINDS:
        if name.startswith(prefix):
            return make(name[len(prefix):])
    key = name.lower()
    if key not in BACKBONES:
        raise unknown("backbone", name, [*BACKBONES, *(shown for _, shown, _ in KINDS)])
    return BACKBONES[key]
