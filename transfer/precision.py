"""``--precision`` and ``--jit-compile``: which machine can train in 16 bits, the Keras dtype policy scoped to a model's
build, and the float32 model that is saved and exported.

* A mixed policy (``mixed_float16``, ``mixed_bfloat16``) is set only while the model is built
  (:func:`dtype_policy`) and restored afterwards, so nothing leaks into later runs of the same process (compare
  cells, tests). Layers built under it compute in 16 bits and keep float32 variables; the classifier's softmax layer
  is built with ``dtype="float32"`` (heads and baselines), so probabilities and the loss stay float32. Keras wraps the
  optimizer in a ``LossScaleOptimizer`` at compile time when the model's policy is ``mixed_float16``.
* What ships is float32: after training, :func:`to_float32` gives every layer the float32 policy (the variables are
  float32 already, so no weight changes), then the run is evaluated and ``model.keras`` saved; exports and their
  verification therefore compare float32 artifacts with a float32 Keras model. The one loader
  (:func:`transfer.runmodel.load_run_model`) applies it too, whatever a ``model.keras`` says.
* :func:`check_device` refuses, in one line, a precision the machine cannot train in.

Importing this module imports no TensorFlow.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from transfer.errors import UserError

FLOAT32 = "float32"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matmul/conv instructions
MIN_CAPABILITY = {"mixed_float16": (7, 0), "mixed_bfloat16": (8, 0)}  # tensor cores: fp16 from Volta, bf16 from Ampere
NAME_PART = {"mixed_float16": "fp16", "mixed_bfloat16": "bf16"}  # default run names of mixed runs end with it


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capability of every visible GPU ((0, 0) where TensorFlow does not say)."""
    import tensorflow as tf

    out = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        except Exception:  # details are best effort
            capability = None
        out.append(tuple(int(v) for v in capability) if capability else (0, 0))
    return out


def check_device(precision: str, *, gpus: list[tuple[int, int]] | None = None, flags: set[str] | None = None) -> str:
    """Refuse (one-line :class:`UserError`) a precision this machine cannot train in; return what trains, in words.

    ``mixed_float16`` needs GPUs of compute capability >= 7.0 (float16 convolutions on a CPU are emulated, many
    times slower than float32); ``mixed_bfloat16`` needs GPUs >= 8.0 or, without a GPU, a CPU with ``avx512_bf16``
    or ``amx_bf16``. ``gpus`` and ``flags`` default to this machine's.
    """
    gpus = gpu_capabilities() if gpus is None else gpus
    if gpus:
        low = min(gpus)
        device = f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''} (compute capability {low[0]}.{low[1]})"
    else:
        device = "CPU"
    if precision == FLOAT32:
        return device
    need = MIN_CAPABILITY.get(precision)
    if need is None:
        raise UserError(f"invalid --precision '{precision}' (choices: float32, {', '.join(MIN_CAPABILITY)})")
    if precision == "mixed_float16" and not gpus:
        raise UserError("--precision mixed_float16 needs a GPU (compute capability >= 7.0); use mixed_bfloat16 on "
                        "CPUs with avx512_bf16/AMX, or float32")
    if gpus and min(gpus) < need:
        low = min(gpus)
        other = "mixed_float16 or " if precision == "mixed_bfloat16" and low >= (7, 0) else ""
        raise UserError(f"--precision {precision} needs a GPU of compute capability >= {need[0]}.{need[1]}, this "
                        f"one has {low[0]}.{low[1]}; use {other}float32")
    if not gpus:
        found = (cpu_flags() if flags is None else flags) & set(BF16_CPU_FLAGS)
        if not found:
            raise UserError("--precision mixed_bfloat16 needs a GPU (compute capability >= 8.0) or a CPU with "
                            "avx512_bf16 or amx_bf16 (this CPU has neither); use float32")
        device = f"CPU ({', '.join(sorted(found))})"
    return device


@contextlib.contextmanager
def dtype_policy(precision: str):
    """Keras' global dtype policy set to ``precision`` inside the block, restored on the way out (even on errors)."""
    import keras

    before = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(before)


def _layers(model):
    return model._flatten_layers(include_self=True, recursive=True)


def compute_dtypes(model) -> dict[str, int]:
    """How many layers (nested ones included) compute in each dtype, e.g. ``{"bfloat16": 20, "float32": 2}``."""
    counts: dict[str, int] = {}
    for layer in _layers(model):
        dtype = str(layer.compute_dtype)
        counts[dtype] = counts.get(dtype, 0) + 1
    return dict(sorted(counts.items()))


def variable_dtypes(model) -> list[str]:
    """The distinct dtypes of the model's variables (weights and BatchNorm statistics)."""
    return sorted({str(v.dtype) for v in model.weights})


def to_float32(model) -> int:
    """Give every layer of ``model`` (nested ones included) the float32 policy; returns how many changed.

    Mixed policies keep float32 variables, so the weights are untouched: only the compute dtype changes. Compiled
    functions of the model are dropped so the next predict/evaluate traces in float32.
    """
    changed = 0
    for layer in _layers(model):
        policy = layer.dtype_policy
        if policy.name != FLOAT32 and policy.quantization_mode is None:
            layer.dtype_policy = FLOAT32
            changed += 1
    if changed:
        for attribute in ("predict_function", "test_function", "train_function"):
            if hasattr(model, attribute):
                setattr(model, attribute, None)
    return changed


def loss_scaling(model) -> bool:
    """Whether ``model`` is compiled with a loss-scale optimizer (Keras adds one for mixed_float16)."""
    import keras

    return isinstance(getattr(model, "optimizer", None), keras.optimizers.LossScaleOptimizer)
