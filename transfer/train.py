"""Two-phase training (head, then fine-tuning) with early stopping, checkpoints and crash-safe resume.

Resume works at epoch granularity: after every epoch the model and optimizer state go to
``checkpoints/last.weights.h5``, the model's random generators (Dropout's...) to ``checkpoints/rng.npz``, and then
``checkpoints/state.json`` (each written atomically, state last), so a run killed at any moment — even mid-write —
restarts from its last completed epoch. The training batches of an epoch are a function of (seed, epoch)
(:func:`transfer.data.pipeline.training_stream`), so the resumed run goes on exactly as the uninterrupted one would
have: the same history, to the last digit, on the same machine.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from transfer.config import TrainConfig
from transfer.errors import UserError
from transfer.freezing import Unfreeze, count_params
from transfer.rundir import HISTORY, read_json, write_json

STATE = "state.json"
LAST = "last.weights.h5"
BEST = "best.weights.npz"
RNG = "rng.npz"  # the model's SeedGenerator states (not in Keras' weight files)
# Early stopping never gives up before this many optimizer steps without a better val_accuracy: a training set of a
# few dozen images is one step an epoch, and --patience epochs of one step each stopped the head of a pretrained
# backbone far from converged (benchmarks/transfer_study.py, docs/transfer.md).
MIN_PATIENCE_STEPS = 100
HISTORY_FIELDS = ("epoch", "phase", "loss", "accuracy", "top5", "val_loss", "val_accuracy", "val_top5", "lr", "seconds")


@dataclass(frozen=True)
class Phase:
    """One stretch of training with a fixed set of trainable layers and one optimizer."""

    name: str
    start_epoch: int
    end_epoch: int
    lr: float
    unfreeze: Unfreeze


def plan_phases(cfg: TrainConfig, unfreeze: Unfreeze, has_backbone: bool = True, schedule=()) -> list[Phase]:
    """A frozen backbone trains the head for ``epochs``; otherwise ``head_epochs`` then ``epochs`` fine-tuning.

    Without a backbone (a model trained from scratch) there is one phase: every layer trains for ``epochs`` at ``lr``.
    An ``--unfreeze-schedule`` (:class:`transfer.freezing.ScheduleStep` s, resolved) splits the fine-tuning epochs:
    ``fine-tune`` with ``unfreeze`` until the first step, then one phase ``fine-tune@E`` per step from fine-tuning
    epoch E on (each recompiled with a fresh optimizer; steps past the last epoch never start).
    """
    if not has_backbone:
        return [Phase("train", 0, cfg.epochs, cfg.lr, Unfreeze(None, "all"))] if cfg.epochs else []
    if schedule:
        phases = [Phase("head", 0, cfg.head_epochs, cfg.lr, Unfreeze(0, "0"))]
        start, end = cfg.head_epochs, cfg.head_epochs + cfg.epochs
        steps = [(0, unfreeze, "fine-tune"), *((s.epoch, s.unfreeze, f"fine-tune@{s.epoch}") for s in schedule)]
        for (epoch, setting, name), (following, _, _) in zip(steps, [*steps[1:], (cfg.epochs, None, None)],
                                                            strict=True):
            phases.append(Phase(name, start + epoch, min(start + following, end), cfg.fine_tune_lr, setting))
        return [p for p in phases if p.end_epoch > p.start_epoch]
    if unfreeze.frozen_backbone:
        return [Phase("head", 0, cfg.epochs, cfg.lr, unfreeze)]
    phases = []
    if cfg.head_epochs:
        phases.append(Phase("head", 0, cfg.head_epochs, cfg.lr, Unfreeze(0, "0")))
    phases.append(Phase("fine-tune", cfg.head_epochs, cfg.head_epochs + cfg.epochs, cfg.fine_tune_lr, unfreeze))
    return [p for p in phases if p.end_epoch > p.start_epoch]


def with_lr_factors(optimizer_cls, factors: dict[int, float]):
    """``optimizer_cls`` with a per-variable learning rate: ``update_step`` runs with the (scheduled) rate times
    ``factors[id(variable)]`` (1 for variables not named), so Adam, SGD with momentum, RMSprop... all move a variable
    exactly as they would at that variable's own rate (``--layer-decay``). The optimizer state is the class's own, so
    checkpoints save and restore it unchanged. (AdamW's decoupled weight decay keeps the full rate.)"""

    class PerVariableRate(optimizer_cls):
        def build(self, variables):
            super().build(variables)
            self._lr_factors = [float(factors.get(id(v), 1.0)) for v in variables]

        def update_step(self, gradient, variable, learning_rate):
            factor = self._lr_factors[self._get_variable_index(variable)]
            return super().update_step(gradient, variable, learning_rate if factor == 1.0 else learning_rate * factor)

    PerVariableRate.__name__ = PerVariableRate.__qualname__ = f"LayerDecay{optimizer_cls.__name__}"
    return PerVariableRate


def make_optimizer(cfg: TrainConfig, lr: float, total_steps: int, lr_factors: dict[int, float] | None = None):
    """The optimizer named in ``cfg`` with its learning-rate schedule over ``total_steps``; ``lr_factors``
    (``id(variable) -> factor``) scales the rate per variable (:func:`with_lr_factors`)."""
    schedules = {
        "constant": lambda: lr,
        "cosine": lambda: keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(total_steps, 1)),
        "exponential": lambda: keras.optimizers.schedules.ExponentialDecay(
            lr, decay_steps=max(total_steps // 10, 1), decay_rate=0.8
        ),
    }
    def cls(base):
        return with_lr_factors(base, lr_factors) if lr_factors else base

    optimizers = {
        "adam": lambda rate: cls(keras.optimizers.Adam)(rate),
        "adamw": lambda rate: cls(keras.optimizers.AdamW)(rate),
        "sgd": lambda rate: cls(keras.optimizers.SGD)(rate, momentum=0.9),
        "rmsprop": lambda rate: cls(keras.optimizers.RMSprop)(rate),
    }
    return optimizers[cfg.optimizer](schedules[cfg.schedule]())


def compile_model(model, cfg: TrainConfig, lr: float, total_steps: int, num_classes: int,
                  lr_factors: dict[int, float] | None = None) -> None:
    """Compile with one-hot cross-entropy (so label smoothing works) and accuracy/top-5 metrics.

    ``--jit-compile`` asks for XLA (``jit_compile=True``); a model Keras cannot XLA-compile is refused in one line.
    Without it Keras decides ("auto": XLA on a GPU when every layer supports it, never on a CPU). A model built under
    ``mixed_float16`` gets Keras' loss-scale optimizer here (Keras wraps it when the model's policy says so).
    """
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes >= 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"))
    model.compile(
        optimizer=make_optimizer(cfg, lr, total_steps, lr_factors),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=metrics,
        jit_compile=True if cfg.jit_compile else "auto",
    )
    if cfg.jit_compile and not model.jit_compile:
        raise UserError("--jit-compile: Keras cannot XLA-compile this model (a layer without XLA support, or "
                        "deterministic ops enabled); run without --jit-compile")


def _fit(model, cfg: TrainConfig, **kwargs):
    """``model.fit``; under ``--jit-compile`` an XLA compilation failure is a one-line UserError."""
    if not cfg.jit_compile:
        return model.fit(**kwargs)
    import tensorflow as tf

    try:
        return model.fit(**kwargs)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, tf.errors.InternalError) as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        detail = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
        raise UserError(f"--jit-compile: XLA could not compile the training step ({detail}); run without "
                        "--jit-compile") from exc


def _write_npz(path: Path, arrays) -> None:
    """``arrays`` to ``path`` as an .npz (``arr_0``, ``arr_1``, ...), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, *arrays)
    os.replace(tmp, path)


def _read_npz(path: Path) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def save_weights_npz(model, path: Path) -> None:
    """Model weights (no optimizer state) to ``path`` atomically."""
    _write_npz(path, model.get_weights())


def load_weights_npz(model, path: Path) -> None:
    model.set_weights(_read_npz(path))


def _generator_states(model) -> list:
    """The state variables of the model's random generators (Dropout, GaussianNoise...), in layer order: Keras'
    ``model.variables`` less its weights and optimizer (``save_weights`` leaves them out)."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def save_generators(model, path: Path) -> None:
    _write_npz(path, [np.asarray(v) for v in _generator_states(model)])


def load_generators(model, path: Path) -> None:
    states, saved = _generator_states(model), _read_npz(path)
    if len(saved) != len(states):
        raise UserError(f"{path}: {len(saved)} random generator states for a model with {len(states)}; "
                        "the checkpoint is not this run's (--overwrite to start it again)")
    for variable, value in zip(states, saved, strict=True):
        variable.assign(value)


def _current_lr(optimizer) -> float:
    try:
        return float(np.asarray(optimizer.learning_rate))
    except (TypeError, ValueError):
        return float("nan")


class RunCheckpoint(keras.callbacks.Callback):
    """History rows, best/last checkpoints, early stopping and resume state, once per epoch.

    Every process keeps the same in-memory state (metrics are reduced across replicas, so early stopping agrees);
    only the ``writer`` (the chief) touches files. The best weights are also kept in memory so no process has to
    read a file another one may still be writing.
    """

    def __init__(self, ckpt_dir: Path, history_path: Path, state: dict, phase: Phase, patience: int,
                 writer: bool = True, memory: dict | None = None):
        super().__init__()
        self.ckpt_dir, self.history_path = ckpt_dir, history_path
        self.state, self.phase, self.patience, self.writer = state, phase, patience, writer
        self.memory = memory if memory is not None else {}
        self._t0 = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        seconds = time.perf_counter() - self._t0
        self.memory["last_logs"] = {"epoch": epoch + 1, **logs}
        if self.writer:
            _append_history(self.history_path, {
                "epoch": epoch + 1,
                "phase": self.phase.name,
                "lr": _current_lr(self.model.optimizer),
                "seconds": round(seconds, 3),
                **{k: logs[k] for k in HISTORY_FIELDS if k in logs},
            })
        state = self.state
        val = logs.get("val_accuracy")
        if val is not None and math.isfinite(val) and val > state["best"]:
            state.update(best=float(val), best_epoch=epoch + 1, wait=0)
            self.memory["best_weights"] = self.model.get_weights()
            if self.writer:
                save_weights_npz(self.model, self.ckpt_dir / BEST)
        else:
            state["wait"] += 1
        state.update(epoch=epoch + 1, phase=self.phase.name, fresh=False)
        state["train_seconds"] += seconds
        if self.writer:
            # Weights (with optimizer state) first, then the state that points at them.
            tmp = self.ckpt_dir / f"tmp-{LAST}"
            self.model.save_weights(tmp)
            os.replace(tmp, self.ckpt_dir / LAST)
            save_generators(self.model, self.ckpt_dir / RNG)
            write_json(self.ckpt_dir / STATE, state)
        if state["wait"] >= self.patience:
            print(
                f"early stopping: no val_accuracy gain for {self.patience} epochs "
                f"(best {state['best']:.4f} at epoch {state['best_epoch']})"
            )
            self.model.stop_training = True


def _append_history(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        handle.flush()
        os.fsync(handle.fileno())


def _truncate_history(path: Path, completed: int) -> None:
    """Drop rows of epochs after ``completed`` (written just before a crash, never checkpointed)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) <= completed]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_history(path: Path) -> list[dict]:
    """history.csv as a list of dicts with numbers parsed."""
    if not path.exists():
        return []
    out = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            parsed = {}
            for key, value in row.items():
                if key == "phase":
                    parsed[key] = value
                elif value not in ("", None):
                    parsed[key] = int(value) if key == "epoch" else float(value)
            out.append(parsed)
    return out


def describe_trainable(model, has_backbone: bool, trainable_layers: list[str], phase: Phase,
                       decay: tuple | None = None) -> dict:
    """Trainable layers and parameter counts after a phase's freezing, printed and returned; with ``--layer-decay``
    (``decay``: ``({block: factor}`` top block first``, {layer name: block})``) also the learning rate of every block
    that trains (``lr_per_block``, top first; layers outside a block count in the block above them)."""
    trainable = count_params(model.trainable_weights)
    total = count_params(model.weights)
    shown = trainable_layers if len(trainable_layers) <= 8 else [*trainable_layers[:3], "...", *trainable_layers[-3:]]
    print(
        f"phase {phase.name} (epochs {phase.start_epoch + 1}-{phase.end_epoch}, lr {phase.lr:g}, "
        f"unfreeze {phase.unfreeze.text}): {len(trainable_layers)} {'backbone ' if has_backbone else ''}"
        "layers trainable"
        + (f" [{', '.join(shown)}]" if shown else "")
        + f"; trainable params {trainable:,} / {total:,}"
    )
    record = {
        "phase": phase.name,
        "start_epoch": phase.start_epoch,
        "end_epoch": phase.end_epoch,
        "unfreeze": phase.unfreeze.text,
        "lr": phase.lr,
        "trainable_layer_count": len(trainable_layers),
        "trainable_backbone_layers": trainable_layers,
        "trainable_params": trainable,
        "total_params": total,
        "non_trainable_params": total - trainable,
    }
    if decay:
        per_block, member = decay
        counts: dict[str | None, int] = {}
        for name in trainable_layers:
            counts[member.get(name)] = counts.get(member.get(name), 0) + 1
        record["lr_per_block"] = [{"block": "(head and above the top block)", "lr": phase.lr,
                                   "trainable_layers": counts.get(None, 0)}]
        record["lr_per_block"] += [{"block": block, "lr": phase.lr * factor, "trainable_layers": counts[block]}
                                   for block, factor in per_block.items() if counts.get(block)]
        low = record["lr_per_block"][-1]
        print(f"  layer decay: lr {phase.lr:g} at the top, {low['lr']:.3g} at {low['block']} "
              f"({len(record['lr_per_block']) - 1} blocks training)")
    return record


@dataclass
class TrainResult:
    phases: list[dict]
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int
    train_seconds: float
    stopped_early: bool


def _restore_best(model, ckpt_dir: Path, memory: dict) -> None:
    if "best_weights" in memory:
        model.set_weights(memory["best_weights"])
    elif (ckpt_dir / BEST).exists():
        load_weights_npz(model, ckpt_dir / BEST)


def effective_patience(patience: int, steps_per_epoch: int) -> int:
    """``--patience`` epochs, but never fewer than :data:`MIN_PATIENCE_STEPS` optimizer steps."""
    return max(int(patience), math.ceil(MIN_PATIENCE_STEPS / max(1, int(steps_per_epoch))))


def train(model, set_trainable: Callable[[Unfreeze], list[str]] | None, *, train_ds, val_ds, steps_per_epoch: int,
          num_classes: int, cfg: TrainConfig, unfreeze: Unfreeze, run_path: Path, strategy=None,
          writer: bool = True, schedule=(),
          lr_factors: Callable[[], tuple[dict[int, float], dict[str, float]]] | None = None) -> TrainResult:
    """Run (or resume) the planned phases; on return ``model`` holds the best weights seen.

    ``train_ds(first_epoch)`` is the endless stream of training batches from that epoch on, ``steps_per_epoch``
    batches an epoch (:func:`transfer.runner.training_pipelines`). ``set_trainable(unfreeze)`` applies a phase's
    unfreeze setting to the model's backbone and returns the names of its trainable layers
    (:attr:`transfer.recipes.BuiltRun.set_trainable`); None means a model without a backbone: one phase in which
    every layer trains. ``strategy`` is the tf.distribute strategy the model was built under (compiling happens in
    its scope); only the ``writer`` process writes checkpoints and history. ``schedule`` (resolved
    ``--unfreeze-schedule`` steps) splits fine-tuning into phases (:func:`plan_phases`);
    ``lr_factors() -> ({id(variable): factor}, {block: factor}, {layer: block})`` is ``--layer-decay``'s
    per-variable rate (:attr:`transfer.recipes.BuiltRun.lr_factors`), applied
    in every phase that trains backbone layers.
    """
    import contextlib

    def scope():
        return strategy.scope() if strategy is not None else contextlib.nullcontext()

    ckpt_dir = run_path / "checkpoints"
    if writer:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    history_path = run_path / HISTORY
    state_path = ckpt_dir / STATE
    fresh_state = {"epoch": 0, "phase": None, "fresh": True, "best": -1.0, "best_epoch": 0, "wait": 0,
                   "train_seconds": 0.0, "stopped_early": False}
    state = read_json(state_path) if state_path.exists() else dict(fresh_state)
    if state["epoch"]:
        print(f"resuming from checkpoint: {state['epoch']} epochs done, best val_accuracy {state['best']:.4f}")
    if writer:
        _truncate_history(history_path, state["epoch"])
    verbose = 1 if sys.stdout.isatty() else 2
    patience = effective_patience(cfg.patience, steps_per_epoch)
    if patience > cfg.patience:
        print(f"early stopping waits {patience} epochs, not --patience {cfg.patience}: {steps_per_epoch} "
              f"step{'s' if steps_per_epoch > 1 else ''} an epoch, and never fewer than {MIN_PATIENCE_STEPS} steps")
    has_backbone = set_trainable is not None
    phases = plan_phases(cfg, unfreeze, has_backbone=has_backbone, schedule=schedule)
    var_factors, *decay = lr_factors() if lr_factors is not None else (None,)
    if state["epoch"] and (ckpt_dir / RNG).exists():
        # Dropout and co. go on from where the checkpointed epoch left their generators (weights come per phase).
        load_generators(model, ckpt_dir / RNG)
    records = []
    memory: dict = {}
    for phase in phases:
        with scope():
            if has_backbone:
                trainable_layers = set_trainable(phase.unfreeze)
            else:  # no backbone: every layer built trainable trains (fixed preprocessing weights stay fixed)
                trainable_layers = [layer.name for layer in model.layers if layer.trainable_weights]
            decayed = var_factors if has_backbone and trainable_layers else None
            compile_model(model, cfg, phase.lr, steps_per_epoch * (phase.end_epoch - phase.start_epoch),
                          num_classes, lr_factors=decayed)
            if strategy is not None:
                from transfer.distribute import patch_keras_for_multi_worker

                patch_keras_for_multi_worker(model, strategy)
            records.append(describe_trainable(model, has_backbone, trainable_layers, phase,
                                              tuple(decay) if decayed else None))
            if state["epoch"] >= phase.end_epoch or (state.get("phase_done") == phase.name):
                continue
            initial = max(state["epoch"], phase.start_epoch)
            if state["phase"] == phase.name and not state["fresh"]:
                model.optimizer.build(model.trainable_variables)
                model.load_weights(ckpt_dir / LAST)
            else:
                _restore_best(model, ckpt_dir, memory)  # a new phase starts from the best weights so far
        if state["phase"] != phase.name:
            state["wait"] = 0
        callbacks = [
            RunCheckpoint(ckpt_dir, history_path, state, phase, patience, writer=writer, memory=memory),
            keras.callbacks.TerminateOnNaN(),
        ]
        if cfg.tensorboard and writer:
            callbacks.append(keras.callbacks.TensorBoard(str(run_path / "logs"), write_graph=False))
        _fit(model, cfg, x=train_ds(initial), steps_per_epoch=steps_per_epoch, validation_data=val_ds,
             epochs=phase.end_epoch, initial_epoch=initial, callbacks=callbacks, verbose=verbose, shuffle=False)
        last = memory.get("last_logs", {})
        if last and not math.isfinite(last.get("loss", 0.0)):
            raise UserError(
                f"training diverged (loss {last.get('loss')}) at epoch {last['epoch']}; "
                "lower --lr/--fine-tune-lr or check the data"
            )
        if state["epoch"] < phase.end_epoch:
            state["stopped_early"] = state["wait"] >= patience
        state.update(phase_done=phase.name, fresh=True, phase=phase.name)
        if writer:
            write_json(state_path, state)
    _restore_best(model, ckpt_dir, memory)
    return TrainResult(
        phases=records,
        best_val_accuracy=state["best"],
        best_epoch=state["best_epoch"],
        epochs_run=state["epoch"],
        train_seconds=state["train_seconds"],
        stopped_early=state["stopped_early"],
    )
