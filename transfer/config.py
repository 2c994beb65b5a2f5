"""The one home of every option: config dataclasses by concern, their defaults, help texts and checks.

The CLI builds its flags from these fields (``transfer.options.add_config_args``), TOML files are type-checked against
them (``transfer.options``), and everything downstream receives the resolved objects. A default lives here and
nowhere else: argparse, ``--help``, compare and pipeline read it from the field. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from transfer.errors import UserError, unknown

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "exponential")
STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker")  # transfer.distribute builds them
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")  # Keras dtype policies; transfer.precision applies them
RANK_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")  # transfer.compare.ranking ranks by them


def option(default, help: str, *, flag: str | None = None, choices: tuple | None = None, metavar: str | None = None,
           cli: bool = True, default_text: str | None = None, repr: bool = True, minimum: float | None = None,
           maximum: float | None = None):
    """A config field with what the CLI and TOML readers need: help text, flag name (default: the field name with
    dashes), choices, bounds (checked by :func:`check_bounds`), and ``cli=False`` for fields no flag sets."""
    return field(default=default, repr=repr, metadata={"help": help, "flag": flag, "choices": choices,
                                                       "metavar": metavar, "cli": cli, "default_text": default_text,
                                                       "minimum": minimum, "maximum": maximum})


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def check_bounds(config) -> None:
    """Refuse a numeric field outside its ``minimum``/``maximum`` with one line naming the flag and the value."""
    for f in fields(config):
        value, low, high = getattr(config, f.name), f.metadata.get("minimum"), f.metadata.get("maximum")
        if (low is None and high is None) or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if (low is not None and not value >= low) or (high is not None and not value <= high):
            flag = "--" + (f.metadata.get("flag") or f.name).replace("_", "-")
            if low is not None and high is not None:
                allowed = f"between {_number(low)} and {_number(high)}"
            else:
                allowed = f">= {_number(low)}" if low is not None else f"<= {_number(high)}"
            raise UserError(f"invalid {flag} {value} (must be {allowed})")


# Largest square input any command accepts: a 64-image batch at this size is already 3 GB of float32 pixels.
MAX_IMAGE_SIZE = 2048
MAX_EPOCHS = 100_000


@dataclass(frozen=True)
class ModelConfig:
    """What to build: backbone, its weights, the input size it sees, the head on top and what unfreezes.

    A recipe resolves it (``transfer.recipes.finetune_recipe``): ``image_size`` becomes an integer and ``unfreeze``
    its canonical text (``0``, ``N``, ``blocks:N`` or ``all``); everything downstream uses the resolved copy.
    """

    backbone: str = option("efficientnet_lite0", "registry name (see `transfer backbones`), hub:HANDLE or "
                           "keras_hub:PRESET; the default's ImageNet weights ship in the [pretrained] extra (offline)")
    weights: str = option("imagenet", "imagenet | none | PATH to a backbone weights file | RUN_DIR of the same "
                          "backbone (start from that run's backbone)")
    image_size: int | None = option(None, "size the backbone sees; images are resized inside the model",
                                    default_text="the backbone's own", minimum=1, maximum=MAX_IMAGE_SIZE)
    head: str = option("default", "pooling then layers, e.g. gap,bn,dropout0.2 or flatten,dense256-bn; "
                       "presets: default (gap,bn,dropout0.2), seeds, linear, mlp")
    unfreeze: str = option("0", "0 (head only) | N (top N backbone layers) | blocks:N (top N blocks, layers above) "
                           "| all")
    unfreeze_schedule: str = option("", "unfreeze more while fine-tuning: SPEC@E,... (e.g. blocks:1@2,blocks:3@4,"
                                    "all@8: after E fine-tuning epochs SPEC applies, recompiled; epochs strictly "
                                    "increasing, each step unfreezing more than --unfreeze and the step before)",
                                    metavar="SPEC@E,...", default_text="none")
    layer_decay: float = option(1.0, "layer-wise learning-rate decay in (0, 1]: while fine-tuning, the head and the "
                                "top backbone block train at the full rate, each block below at F times the rate of "
                                "the block above, the stem at the lowest block's rate; 1 = off", metavar="F")

    def __post_init__(self):
        check_bounds(self)
        if isinstance(self.layer_decay, bool) or not isinstance(self.layer_decay, int | float) \
                or not 0 < self.layer_decay <= 1:
            raise UserError(f"invalid --layer-decay {self.layer_decay} (must be in (0, 1]; 1 = off)")
        from transfer.freezing import parse_schedule

        parse_schedule(self.unfreeze_schedule, self.unfreeze)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: two phases (head, then fine-tuning) sharing one optimizer recipe."""

    optimizer: str = option("adam", "optimizer", choices=OPTIMIZERS)
    lr: float = option(1e-3, "learning rate of the head phase")
    fine_tune_lr: float = option(1e-4, "learning rate once layers are unfrozen")
    schedule: str = option("constant", "learning-rate schedule per phase", choices=SCHEDULES)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy, in [0, 1)")
    class_weight: str = option("none", "per-class loss weights: none | balanced (n_samples / (n_classes * count) "
                               "from the training split) | FILE (TOML or JSON map {class name: weight}; classes it "
                               "does not name weigh 1.0; weights finite and > 0)", metavar="none|balanced|FILE")
    batch_size: int = option(64, "global batch size", minimum=1, maximum=65_536)
    epochs: int = option(10, "epochs of the fine-tuning phase (of the only phase with --unfreeze 0)", minimum=0,
                         maximum=MAX_EPOCHS)
    head_epochs: int = option(3, "epochs training the head on a frozen backbone before unfreezing", minimum=0,
                              maximum=MAX_EPOCHS)
    patience: int = option(5, "early stopping on val_accuracy after this many epochs without a gain, and never "
                           "before 100 optimizer steps without one (a tiny training set is one step an epoch); the "
                           "best weights are restored", minimum=1, maximum=MAX_EPOCHS)
    seed: int = option(0, "seed of splits, initialisation, shuffling and augmentation", minimum=0, maximum=2**32 - 1)
    tensorboard: bool = option(True, "write TensorBoard logs")
    precision: str = option("float32", "Keras dtype policy while training: mixed_float16 (GPUs of compute capability "
                            ">= 7.0) and mixed_bfloat16 (GPUs >= 8.0, CPUs with avx512_bf16/AMX) compute in 16 bits "
                            "with float32 weights and softmax; model.keras and every export stay float32",
                            choices=PRECISIONS)
    jit_compile: bool = option(False, "compile the training step with XLA (jit_compile=True); not part of the run's "
                               "identity", default_text="off: Keras' choice (XLA on a GPU when every layer supports "
                               "it, never on CPUs)")

    def __post_init__(self):
        check_bounds(self)
        checks = (
            (self.precision in PRECISIONS, f"--precision '{self.precision}' (choices: {', '.join(PRECISIONS)})"),
            (self.optimizer in OPTIMIZERS, f"--optimizer '{self.optimizer}' (choices: {', '.join(OPTIMIZERS)})"),
            (self.schedule in SCHEDULES, f"--schedule '{self.schedule}' (choices: {', '.join(SCHEDULES)})"),
            (self.lr > 0, f"--lr {self.lr} (must be > 0)"),
            (self.fine_tune_lr > 0, f"--fine-tune-lr {self.fine_tune_lr} (must be > 0)"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing {self.label_smoothing} (must be in [0, 1))"),
        )
        for ok, message in checks:
            if not ok:
                raise UserError(f"invalid {message}")
        from transfer.class_weights import check_spec

        check_spec(self.class_weight)


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

    preset: str = option("light", "augmentation preset: none | light | strong", flag="augment")
    flip: bool | None = option(None, "override the preset's horizontal flip (on | off)", default_text="the preset's")
    rotation: float | None = option(None, "override the preset's rotation (fraction of a full turn; 0 disables)",
                                    default_text="the preset's")
    zoom: float | None = option(None, "override the preset's zoom (fraction; 0 disables)", default_text="the preset's")
    shift: float | None = option(None, "override the preset's shift (width/height fraction; 0 disables)",
                                 default_text="the preset's")
    contrast: float | None = option(None, "override the preset's contrast (factor; 0 disables)",
                                    default_text="the preset's")
    brightness: float | None = option(None, "override the preset's brightness (fraction of 255; 0 disables)",
                                      default_text="the preset's")

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

    dataset: str = option("synthetic", "a dataset source (see `transfer datasets`): digits, cifar10, folder:PATH, ...")
    data_dir: str | None = option(None, "pre-downloaded copy of a Keras dataset (air-gapped machines)")
    val_split: float = option(0.1, "fraction of training data held out for validation")
    test_split: float = option(0.1, "fraction held out for test (folder datasets without a test/ sub-folder)")
    seed: int = option(0, "split seed (the run's --seed)", cli=False)
    folder_image_size: int | None = option(
        None, "folder datasets: decode and resize images to this square size instead of the model's input size",
        default_text="the model's input size (a backbone's --image-size; 32 for the scratch baselines)",
        minimum=1, maximum=MAX_IMAGE_SIZE)
    cache: str = option("none", "folder datasets: keep decoded images in 'memory', in a DIR (kept across runs and "
                        "shared by runs at the same size), or 'none' (decoded every epoch, memory stays flat)",
                        metavar="none|memory|DIR")
    synthetic_train: int = option(2000, "synthetic set: training images", minimum=1, maximum=1_000_000)
    synthetic_test: int = option(500, "synthetic set: test images", minimum=1, maximum=1_000_000)
    limit_train: int | None = option(None, "use a seeded, stratified subset of this many training images", minimum=1)

    def __post_init__(self) -> None:
        check_bounds(self)
        for name in ("val_split", "test_split"):
            value = getattr(self, name)
            if not 0 <= value < 0.9:
                raise UserError(f"{name}={value} is out of range; expected a fraction in [0, 0.9)")
        if self.val_split + self.test_split >= 1:
            total = self.val_split + self.test_split
            raise UserError(f"val_split + test_split = {total:g} leaves no training data; keep it below 1")
        if self.seed < 0:
            raise UserError(f"seed={self.seed} must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    """Where a run goes (``<artifacts>/runs/<name>``) and how it is executed; not part of the run's identity."""

    artifacts: str = option("artifacts", "artifacts root (runs go to <artifacts>/runs/<name>)")
    name: str | None = option(None, "run name", default_text="derived from the config, so running again resumes")
    overwrite: bool = option(False, "replace an existing run of the same name")
    keep_checkpoints: bool = option(False, "keep the weight checkpoints of a complete run (by default only state.json)")
    strategy: str = option("auto", "tf.distribute strategy: auto | one-device | mirrored | multi-worker (TF_CONFIG)",
                           choices=STRATEGIES)
    options: tuple = option((), "the command's effective option values, written to config.toml", cli=False)
    command: str = option("", "the command that made the run (for the replay line in config.toml)", cli=False)

    def run_path(self, default_name: str):
        from pathlib import Path

        from transfer import rundir

        return Path(self.artifacts) / "runs" / rundir.slug(self.name or default_name)


@dataclass(frozen=True)
class CompareConfig:
    """The top level of a comparison: its name, seeds, defaults of its fine-tuned cells and measurement."""

    name: str = option("compare", "report name: <artifacts>/reports/<name>/")
    seeds: int = option(1, "repeat every cell with this many seeds (--seed, --seed+1, ...)", minimum=1, maximum=1000)
    weights: str = option("imagenet", "backbone weights of every fine-tuned cell: imagenet | none | PATH")
    head: str = option("default", "head of every fine-tuned cell")
    artifacts: str = option("artifacts", "artifacts root")
    latency_runs: int = option(30, "timed batch-1 calls per model (median reported)", minimum=1, maximum=100_000)
    rank_by: str = option("accuracy", "test metric that ranks the cells and picks the winners (intervals: Wilson for "
                          "accuracy, a seeded bootstrap over the test images for the others)",
                          choices=RANK_METRICS)

    def __post_init__(self):
        check_bounds(self)
        if self.rank_by not in RANK_METRICS:
            raise UserError(f"invalid --rank-by '{self.rank_by}' (choices: {', '.join(RANK_METRICS)})")


@dataclass(frozen=True)
class MatrixConfig:
    """A matrix of cells: every baseline, and every backbone x image size x unfreeze setting."""

    baselines: list[str] = option((), "comma-separated baseline names (see `transfer baselines`)",
                                  default_text="none")
    backbones: list[str] = option((), "comma-separated backbone names (see `transfer backbones`)",
                                  default_text="none")
    unfreeze: list[str | int] = option(("0",), "comma-separated unfreeze settings for every backbone, e.g. 0,4,all")
    image_sizes: list[int] = option((), "comma-separated image sizes for every backbone", default_text="its own")
    weights: str | None = option(None, "weights of this matrix's backbones", default_text="--weights")
    head: str | None = option(None, "head of this matrix's backbones", default_text="--head")


@dataclass(frozen=True)
class CellConfig:
    """One explicit cell of a comparison: a baseline, or a backbone with its own settings."""

    name: str | None = option(None, "cell name", default_text="derived from its settings")
    baseline: str | None = option(None, "baseline name")
    backbone: str | None = option(None, "backbone name")
    image_size: int | None = option(None, "image size", default_text="the backbone's own")
    unfreeze: str | int = option("0", "unfreeze setting")
    weights: str | None = option(None, "backbone weights", default_text="--weights")
    head: str | None = option(None, "head", default_text="--head")


@dataclass(frozen=True)
class ExportStepConfig:
    """The pipeline's export step: which formats every winner is exported to."""

    formats: str | list[str] = option("all", "export formats of every winner (families or format names)")
    quantize: str | list[str] | None = option(None, "quantized variants (tflite: fp16, dynamic, int8; onnx: int8; all)",
                                              default_text="all when formats is all")
    calibration_samples: int | None = option(None, "int8: training images for calibration",
                                             default_text="the exporter's")


@dataclass(frozen=True)
class BenchConfig:
    """Benchmark settings: threads every runtime uses, timed runs, warm-up runs."""

    threads: int = option(1, "threads every runtime uses", minimum=1, maximum=1024)
    iterations: int = option(50, "timed runs at batch 1 (a quarter at batch 32)", minimum=1, maximum=1_000_000)
    warmup: int = option(5, "untimed runs first", minimum=0, maximum=1_000_000)

    def __post_init__(self):
        check_bounds(self)


def as_dict(*configs) -> dict:
    """Merge dataclass configs into one JSON-ready dict keyed by config kind."""
    out = {}
    for config in configs:
        key = type(config).__name__.removesuffix("Config").lower()
        out[key] = dataclasses.asdict(config)
    return out
