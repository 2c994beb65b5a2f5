"""`transfer predict`: classify image files with any format of an export directory, without a server.

The export is read through export.contract.ExportDir and the format loaded by its row's runtime
(export.formats.load_format), so every format the manifest lists can be used; only savedmodel imports TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.contract import ExportDir
from export.formats import load_format
from transfer.errors import UserError
from transfer.images import DECODE_ERRORS, decode_image


def decode_files(export: ExportDir, files: list[str]) -> np.ndarray:
    """Image files as a float32 batch at the export's input size, decoded like the training pipeline."""
    images = []
    for f in files:
        try:
            images.append(decode_image(f, export.size))
        except FileNotFoundError as exc:
            raise UserError(f"{f}: no such file") from exc
        except DECODE_ERRORS as exc:
            raise UserError(f"{f} could not be decoded as an image: {exc}") from exc
    return np.stack(images).astype(np.float32)


def predict_files(export_dir: str | Path, files: list[str], fmt: str = "onnx") -> tuple[ExportDir, np.ndarray]:
    """The export and the (N, classes) probabilities of ``files`` under ``fmt``."""
    export = ExportDir.open(export_dir, check_name=False)
    predictor = load_format(export, fmt)
    return export, predictor(decode_files(export, files))
