"""Small configs by concern: model, training, run. The CLI maps flags onto them; nothing else reads flags."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields

from transfer.errors import UserError, unknown

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "exponential")


@dataclass(frozen=True)
class ModelConfig:
    """What to build: backbone, its weights, the input size it sees and the head on top."""

    backbone: str = "mobilenetv2"
    weights: str = "imagenet"  # imagenet | none | PATH to a weights file
    image_size: int | None = None  # None: the backbone's default size
    head: str = "default"
    unfreeze: str = "0"  # 0 | N | all


@dataclass(frozen=True)
class TrainConfig:
    """How to train: two phases (head, then fine-tuning) sharing one optimizer recipe."""

    optimizer: str = "adam"
    lr: float = 1e-3
    fine_tune_lr: float = 1e-4
    schedule: str = "constant"
    label_smoothing: float = 0.0
    batch_size: int = 64
    epochs: int = 10
    head_epochs: int = 3
    patience: int = 5
    seed: int = 0
    tensorboard: bool = True

    def __post_init__(self):
        checks = (
            (self.optimizer in OPTIMIZERS, f"--optimizer '{self.optimizer}' (choices: {', '.join(OPTIMIZERS)})"),
            (self.schedule in SCHEDULES, f"--schedule '{self.schedule}' (choices: {', '.join(SCHEDULES)})"),
            (self.lr > 0, f"--lr {self.lr} (must be > 0)"),
            (self.fine_tune_lr > 0, f"--fine-tune-lr {self.fine_tune_lr} (must be > 0)"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing {self.label_smoothing} (must be in [0, 1))"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size} (must be >= 1)"),
            (self.epochs >= 0, f"--epochs {self.epochs} (must be >= 0)"),
            (self.head_epochs >= 0, f"--head-epochs {self.head_epochs} (must be >= 0)"),
            (self.patience >= 1, f"--patience {self.patience} (must be >= 1)"),
        )
        for ok, message in checks:
            if not ok:
                raise UserError(f"invalid {message}")


_AUG_PRESETS: dict[str, dict[str, float | bool]] = {
    "none": {"flip": False, "rotation": 0.0, "zoom": 0.0, "shift": 0.0, "contrast": 0.0, "brightness": 0.0},
    # The seeds' "3 VGG blocks + data augmentation" baseline: width/height shift 0.1 and horizontal flip.
    "light": {"flip": True, "rotation": 0.0, "zoom": 0.0, "shift": 0.1, "contrast": 0.0, "brightness": 0.0},
    # The seeds' augmented CIFAR-10 model (rotation 20 degrees, shift 0.2, flip), plus zoom, contrast, brightness.
    "strong": {"flip": True, "rotation": 20 / 360, "zoom": 0.2, "shift": 0.2, "contrast": 0.2, "brightness": 0.2},
}
# Largest accepted value of every numeric augmentation op (the smallest is 0).
_AUG_LIMITS = {"rotation": 0.5, "zoom": 0.9, "shift": 0.9, "contrast": 1.0, "brightness": 1.0}


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation: a preset plus optional per-op overrides (None = the preset's value)."""

    preset: str = "light"
    flip: bool | None = None
    rotation: float | None = None
    zoom: float | None = None
    shift: float | None = None
    contrast: float | None = None
    brightness: float | None = None

    def resolved(self) -> dict[str, float | bool]:
        """The preset merged with the overrides, validated; raises UserError on a bad preset or value."""
        if self.preset not in _AUG_PRESETS:
            raise unknown("augment preset", self.preset, _AUG_PRESETS)
        ops = dict(_AUG_PRESETS[self.preset])
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "preset" and value is not None:
                ops[f.name] = value
        if not isinstance(ops["flip"], bool):
            raise UserError(f"augment flip must be true or false, got {ops['flip']!r}")
        for name, limit in _AUG_LIMITS.items():
            value = ops[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= limit:
                raise UserError(f"augment {name}={value!r} is out of range; expected a number in [0, {limit}]")
            ops[name] = float(value)
        return ops


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to load and how to split it; invalid values raise UserError on construction."""

    dataset: str = "synthetic"
    data_dir: str | None = None
    val_split: float = 0.1
    test_split: float = 0.1
    seed: int = 0
    folder_image_size: int = 64
    synthetic_train: int = 2000
    synthetic_test: int = 500
    limit_train: int | None = None

    def __post_init__(self) -> None:
        for name in ("val_split", "test_split"):
            value = getattr(self, name)
            if not 0 <= value < 0.9:
                raise UserError(f"{name}={value} is out of range; expected a fraction in [0, 0.9)")
        if self.val_split + self.test_split >= 1:
            total = self.val_split + self.test_split
            raise UserError(f"val_split + test_split = {total:g} leaves no training data; keep it below 1")
        if self.seed < 0:
            raise UserError(f"seed={self.seed} must be >= 0")
        positive = ("folder_image_size", "synthetic_train", "synthetic_test")
        for name in positive + (("limit_train",) if self.limit_train is not None else ()):
            if getattr(self, name) <= 0:
                raise UserError(f"{name}={getattr(self, name)} must be > 0")


def as_dict(*configs) -> dict:
    """Merge dataclass configs into one JSON-ready dict keyed by config kind."""
    out = {}
    for config in configs:
        key = type(config).__name__.removesuffix("Config").lower()
        out[key] = dataclasses.asdict(config)
    return out


def config_hash(config: dict) -> str:
    """A short stable hash of a config dict (used to tell whether a run dir is the same run)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
