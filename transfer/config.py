"""Small configs by concern: model, training, run. The CLI maps flags onto them; nothing else reads flags."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from transfer.errors import UserError

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
