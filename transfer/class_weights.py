"""``--class-weight none|balanced|FILE``: per-class loss weights for imbalanced training data.

* ``none``: every sample weighs 1 (the default; such a run's identity is the same as before the option existed).
* ``balanced``: ``n_samples / (n_classes * count_c)`` over the **training split** (scikit-learn's definition), so
  the weights average 1 over the training images and the loss keeps its scale.
* ``FILE``: a TOML or JSON map ``{class name: weight}``; classes it does not name weigh 1.0; a class name the
  dataset does not have, and a weight that is not a finite number > 0, are refused.

Training applies them as per-sample weights mapped in the training pipeline (``transfer.runner.training_pipelines``),
which works the same under every tf.distribute strategy and on resume. The resolved weights, their source and the
file's sha256 go to the manifest (``class_weight``), and the run's config carries them, so resuming with other
weights is refused like any other change. NumPy only: nothing here imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tomllib

from transfer.errors import UserError, closest

NONE, BALANCED, FILE = "none", "balanced", "file"
FLAG = "--class-weight"


@dataclass(frozen=True)
class ClassWeights:
    """Resolved class weights: ``source`` (none | balanced | file), one weight per class in class order."""

    source: str
    weights: dict[str, float]
    file: str | None = None
    sha256: str | None = None

    def vector(self, classes: list[str]) -> list[float]:
        return [self.weights[name] for name in classes]

    def record(self) -> dict:
        """What the manifest records (``manifest["class_weight"]``)."""
        return {"source": self.source, "file": self.file, "sha256": self.sha256, "weights": dict(self.weights)}

    def identity(self):
        """This part of the run's config (``config["train"]["class_weight"]``); None for ``none``, which leaves the
        key out so runs made before the option existed keep their identity. A file counts by its content (sha256),
        not its path."""
        if self.source == NONE:
            return None
        if self.source == BALANCED:
            return BALANCED
        return {"source": FILE, "sha256": self.sha256, "weights": dict(self.weights)}


def read_weight_file(path: str | Path) -> tuple[dict[str, float], str]:
    """The one reader of a ``--class-weight`` FILE: ``({class name: weight}, sha256 of the file's bytes)``.

    JSON when the name ends in ``.json`` or the text starts with ``{``, else TOML. Every weight must be a finite
    number > 0; anything else is a one-line UserError.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise UserError(f"{FLAG} '{path}' is not none, balanced or an existing TOML/JSON file"
                        + (f"; did you mean '{guess}'?" if (guess := closest(str(path), (NONE, BALANCED))) else "")
                        ) from exc
    except IsADirectoryError as exc:
        raise UserError(f"{FLAG} '{path}' is a directory; pass a TOML or JSON file of class weights") from exc
    except OSError as exc:
        raise UserError(f"{FLAG} '{path}' cannot be read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8")
        if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
            data, kind = json.loads(text, object_pairs_hook=_no_duplicates), "JSON"
        else:
            data, kind = tomllib.loads(text), "TOML"
    except _Duplicate as exc:
        raise UserError(f"{FLAG} '{path}' names class '{exc.args[0]}' twice; give each class one weight") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{FLAG} '{path}' is not valid TOML or JSON ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{FLAG} '{path}' must hold a {kind} map of class name to weight")
    weights = {}
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{FLAG} '{path}': weight of class '{name}' must be a number, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"{FLAG} '{path}': weight of class '{name}' is {value!r}; weights must be finite and > 0")
        weights[str(name)] = float(value)
    return weights, hashlib.sha256(raw).hexdigest()


def check_spec(spec: str) -> None:
    """Refuse a bad ``--class-weight`` before any data is read (a FILE is read and checked; class names are
    checked once the dataset is loaded, by :func:`resolve`)."""
    if spec not in (NONE, BALANCED):
        read_weight_file(spec)


def balanced_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """``n_samples / (n_classes * count_c)`` per class (scikit-learn's ``balanced``), ``n_classes`` counting the
    classes present in ``y``; a class with no samples gets 1.0 (no sample of it is ever weighted)."""
    counts = np.bincount(np.asarray(y, np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    out = np.ones(num_classes)
    out[present] = counts.sum() / (present.sum() * counts[present])
    return out


def resolve(spec: str, classes: list[str], train_y: np.ndarray) -> ClassWeights:
    """``--class-weight`` resolved against the dataset: one weight per class (``balanced`` from the training split's
    counts). A FILE naming classes the dataset does not have is a one-line UserError listing the valid ones."""
    if spec == NONE:
        return ClassWeights(NONE, {name: 1.0 for name in classes})
    if spec == BALANCED:
        weights = balanced_weights(train_y, len(classes))
        return ClassWeights(BALANCED, {name: float(w) for name, w in zip(classes, weights, strict=True)})
    given, sha256 = read_weight_file(spec)
    unknown = [name for name in given if name not in classes]
    if unknown:
        guess = closest(unknown[0], classes)
        hint = f" (did you mean '{guess}'?)" if guess else ""
        raise UserError(f"{FLAG} '{spec}' names classes the dataset does not have: {', '.join(unknown)}{hint}; "
                        f"valid classes: {', '.join(classes)}")
    return ClassWeights(FILE, {name: given.get(name, 1.0) for name in classes}, file=str(spec), sha256=sha256)


class _Duplicate(ValueError):
    """A JSON object names one key twice (json keeps the last silently)."""


def _no_duplicates(pairs: list[tuple]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen
