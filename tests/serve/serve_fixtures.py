"""Export directories for the serve tests, made the way users make them: a real run trained by the `transfer`
command on a folder of red, green and blue images, exported by the real exporter (export.exporter.run_export).

Also used by benchmarks/serve_load.py. Training a tiny LeNet-5 for a dozen epochs on 32x32 images and exporting
it takes about ten seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HUES = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
EXPORTED_FORMATS = ("onnx", "savedmodel", "tflite", "tflite_fp16")  # what the serve tests' export holds
CLASSES = tuple(sorted(HUES))  # a folder dataset's classes are its sorted sub-folder names: output index order


def write_color_folder(root: Path, per_class: int = 30, seed: int = 0) -> Path:
    """``root/<colour>/*.png``: noisy images of varied sizes around each colour of HUES."""
    rng = np.random.default_rng(seed)
    for name, hue in HUES.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array(hue) + rng.integers(-60, 61, 3)
            pixels = np.clip(base + rng.integers(-40, 41, (20 + i % 7, 24 + i % 5, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def train_run(work: Path, name: str = "tiny", image_size: int = 32, baseline: str = "lenet5", epochs: int = 12,
              per_class: int = 30) -> Path:
    """A complete run directory ``work/artifacts/runs/<name>`` trained by ``transfer baseline`` on colour folders."""
    from transfer.cli import main

    data = write_color_folder(work / "colours", per_class)
    code = main(["baseline", "--model", baseline, "--dataset", f"folder:{data}", "--folder-image-size", str(image_size),
                 "--epochs", str(epochs), "--batch-size", "16", "--no-tensorboard",
                 "--artifacts", str(work / "artifacts"), "--name", name])
    assert code == 0, f"training the fixture run failed with exit code {code}"
    return work / "artifacts" / "runs" / name


def build_export(dest: Path, formats: tuple[str, ...] = ("onnx", "savedmodel", "tflite"), image_size: int = 32,
                 baseline: str = "lenet5", epochs: int = 12) -> Path:
    """Train a run beside ``dest`` (in ``<dest>.run/``) and export ``formats`` of it into ``dest``, verified."""
    from export.exporter import ExportConfig, run_export

    run_dir = train_run(dest.with_name(f"{dest.name}.run"), dest.name, image_size, baseline, epochs)
    result = run_export(ExportConfig(run_dir=str(run_dir), formats=",".join(formats), out=str(dest)))
    failed = {n: e["status"] for n, e in result.manifest["export"]["formats"].items() if e["status"] != "verified"}
    assert not failed, f"the fixture export did not verify: {failed}"
    return dest


def keras_model(export_dir: Path):
    """The Keras model of the run an export was made from."""
    import keras

    import transfer.layers  # noqa: F401  (registers the custom layers for loading)

    manifest = json.loads((export_dir / "manifest.json").read_text())
    return keras.models.load_model(Path(manifest["export"]["source_run"]) / "model.keras")


def relabel_copy(src: Path, dest: Path, classes: tuple[str, ...]) -> Path:
    """A copy of an export under another folder name with other class names (same model): a second repo entry."""
    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["classes"], manifest["name"] = list(classes), dest.name
    (dest / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (dest / "labels.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    return dest


def permuted_copy(src: Path, dest: Path, permutation: tuple[int, ...], classes: tuple[str, ...]) -> Path:
    """A copy of an export whose ONNX model has other weights in effect: its outputs come out in ``permutation``'s
    order (output ``i`` is the source's output ``permutation[i]``, by a Gather appended to the graph), with
    ``classes`` as its labels and its manifest's sha256 and size for the new model.onnx. With classes that name the
    permuted outputs, it answers what the source answers under other names; with the source's labels (or the
    source's weights with these labels) it answers something else: answers tell which export produced them."""
    import onnx
    from onnx import helper, numpy_helper

    relabel_copy(src, dest, classes)
    model = onnx.load(str(dest / "model.onnx"))
    graph, out = model.graph, model.graph.output[0].name
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = f"{out}_unpermuted"
    graph.initializer.append(numpy_helper.from_array(np.array(permutation, np.int64), "output_permutation"))
    graph.node.append(helper.make_node("Gather", [f"{out}_unpermuted", "output_permutation"], [out], axis=1))
    onnx.save(model, str(dest / "model.onnx"))
    data = (dest / "model.onnx").read_bytes()
    manifest = json.loads((dest / "manifest.json").read_text())
    entry = manifest["export"]["formats"]["onnx"]
    entry["sha256"], entry["size_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (dest / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return dest


def rewrite_in_place(folder: Path, source: Path, names: tuple[str, ...] = ("model.onnx", "manifest.json",
                                                                           "labels.txt")) -> None:
    """Overwrite ``names`` in ``folder`` with ``source``'s, each truncated and written in place (same inode, not
    swapped in by a rename): what a careless deploy script does, and what readers of ``folder`` may see half done."""
    for name in names:
        with open(folder / name, "r+b") as f:
            f.truncate(0)
            f.write((source / name).read_bytes())
