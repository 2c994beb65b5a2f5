"""Backbone registry: Keras Applications and TF Hub feature-vector models, looked up by name."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from transfer.errors import UserError, unknown

HUB_PREFIX = "hub:"


@dataclass(frozen=True)
class Backbone:
    """One row of the registry: how to build a backbone and what it expects.

    ``preprocessing`` names the in-graph scaling applied to raw 0..255 RGB pixels before the
    backbone (see :class:`transfer.layers.Preprocess`); ``block_pattern`` is a regex whose first
    group names the block a layer belongs to; ``weights_file`` is the name Keras caches the
    ImageNet no-top weights under (``{size}`` is replaced for size-dependent files).
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

    @property
    def is_hub(self) -> bool:
        return False

    def weights_filename(self, size: int) -> str:
        """The Keras cache file name of the ImageNet no-top weights at ``size``."""
        if self.weight_sizes:
            size = size if size in self.weight_sizes else self.default_size
        return self.weights_file.format(size=size)

    def block_of(self, layer_name: str) -> str | None:
        """The block a layer belongs to, or None for stem/top layers outside any block."""
        match = re.match(self.block_pattern, layer_name)
        return match.group(1) if match else None


@dataclass(frozen=True)
class HubBackbone:
    """A TF Hub image feature-vector model: URL, Kaggle handle or local SavedModel directory."""

    handle: str
    default_size: int = 224
    min_size: int = 1
    preprocessing: str = "unit"
    family: str = "hub"

    @property
    def name(self) -> str:
        return HUB_PREFIX + self.handle

    @property
    def is_hub(self) -> bool:
        return True

    def block_of(self, layer_name: str) -> str | None:
        return None


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


def backbone_names() -> list[str]:
    """Registered backbone names, plus the ``hub:`` form."""
    return sorted(BACKBONES)


def get_backbone(name: str) -> Backbone | HubBackbone:
    """Look a backbone up by name; ``hub:HANDLE`` gives a TF Hub backbone."""
    if name.startswith(HUB_PREFIX):
        handle = name[len(HUB_PREFIX):]
        if not handle:
            raise UserError("empty hub handle; use hub:<url | Kaggle handle | SavedModel dir>")
        return HubBackbone(handle=handle)
    key = name.lower()
    if key not in BACKBONES:
        raise unknown("backbone", name, [*BACKBONES, "hub:<handle>"])
    return BACKBONES[key]


def keras_home() -> Path:
    """Where Keras caches downloads (``KERAS_HOME`` or ``~/.keras``)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def cached_weights_path(backbone: Backbone, size: int | None = None) -> Path:
    """Where Keras looks for (and caches) the ImageNet no-top weights of ``backbone``."""
    return keras_home() / "models" / backbone.weights_filename(size or backbone.default_size)


def weights_cached(backbone: Backbone | HubBackbone, size: int | None = None) -> bool | None:
    """Whether ImageNet weights are already cached (None: not applicable, e.g. Hub)."""
    if backbone.is_hub:
        return None
    return cached_weights_path(backbone, size).exists()


def check_image_size(backbone: Backbone | HubBackbone, size: int) -> None:
    """Refuse an input size the backbone cannot take."""
    if size < backbone.min_size:
        raise UserError(
            f"--image-size {size} is below {backbone.name}'s minimum of {backbone.min_size}; "
            f"use --image-size {backbone.min_size} or more (default {backbone.default_size})"
        )
