"""Orchestrates a training run: validate, load data, build, train or resume, evaluate, write the run dir."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from transfer import rundir
from transfer.config import RunConfig, TrainConfig, as_dict
from transfer.errors import UserError

INPUT_SPEC_RANGE = (0.0, 255.0)


def library_versions() -> dict:
    """Versions of the libraries a run depends on."""
    out = {"python": platform.python_version()}
    for package in ("tensorflow", "keras", "numpy", "tensorflow-hub", "tf-keras", "transfer-toolkit"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def _input_spec(native_shape) -> dict:
    return {
        "name": "image",
        "shape": list(native_shape),
        "dtype": "float32",
        "layout": "NHWC",
        "color": "RGB",
        "range": list(INPUT_SPEC_RANGE),
        "resize_interpolation": "bilinear",
    }


def check_plan(model_cfg, data_cfg, train_cfg: TrainConfig) -> None:
    """Options that would be accepted and then do nothing are one-line refusals: a run that trains no epoch, an
    ``--unfreeze-schedule`` step after the last fine-tuning epoch, ``--layer-decay`` on a backbone that never
    unfreezes, ``--cache DIR|memory`` on a dataset that is not a folder."""
    from transfer.data.folders import FOLDER_PREFIX

    unfreeze = str(getattr(model_cfg, "unfreeze", "all"))
    schedule = str(getattr(model_cfg, "unfreeze_schedule", "") or "")
    frozen = unfreeze == "0" and not schedule
    trained = train_cfg.epochs if frozen or not hasattr(model_cfg, "unfreeze") else \
        train_cfg.head_epochs + train_cfg.epochs
    if trained == 0:
        raise UserError(f"--epochs {train_cfg.epochs}"
                        + ("" if frozen or not hasattr(model_cfg, "unfreeze") else f" with --head-epochs "
                           f"{train_cfg.head_epochs}") + " trains nothing; give --epochs 1 or more")
    for step in filter(None, schedule.split(",")):
        epoch = int(step.rsplit("@", 1)[1])
        if epoch >= train_cfg.epochs:
            raise UserError(f"--unfreeze-schedule step '{step}' never applies: fine-tuning lasts --epochs "
                            f"{train_cfg.epochs}; give E below {train_cfg.epochs} or more --epochs")
    decay = float(getattr(model_cfg, "layer_decay", 1.0))
    if decay != 1.0 and frozen:
        raise UserError(f"--layer-decay {decay:g} does nothing with --unfreeze 0 (the backbone never trains); "
                        "unfreeze some of it (--unfreeze blocks:N or all) or drop --layer-decay")
    if data_cfg.cache != "none" and not data_cfg.dataset.startswith(FOLDER_PREFIX):
        raise UserError(f"--cache {data_cfg.cache} applies to folder datasets only; '{data_cfg.dataset}' is held "
                        "in memory already: drop --cache")


def execute(recipe, data_cfg, augment_cfg, train_cfg: TrainConfig, run_cfg: RunConfig) -> Path:
    """Run a training job end to end and return its run directory (complete on return).

    Under multi-worker training every worker runs this; only the chief writes the run directory.
    """
    from transfer import precision
    from transfer.data import load_dataset
    from transfer.distribute import barrier, is_chief, make_strategy, shard_by_data

    check_plan(recipe.model_config, data_cfg, train_cfg)
    started = time.perf_counter()
    part = precision.NAME_PART.get(train_cfg.precision)
    run_path = run_cfg.run_path(recipe.default_name + (f"_{part}" if part else ""))
    strategy = make_strategy(run_cfg.strategy)
    device = precision.check_device(train_cfg.precision)  # a precision this machine cannot train in: one line, no trace
    if train_cfg.precision != precision.FLOAT32 or train_cfg.jit_compile:
        print(f"precision: {train_cfg.precision} on {device}" + (", XLA (--jit-compile)" if train_cfg.jit_compile
                                                                  else "") + "; model.keras and exports float32")
    chief = is_chief(strategy)
    if run_cfg.strategy != "auto" or strategy.num_replicas_in_sync > 1:
        print(f"strategy: {run_cfg.strategy} ({type(strategy).__name__}) with {strategy.num_replicas_in_sync} replicas"
              + ("" if chief else " (this worker does not write the run directory)"))
    if chief:
        rundir.check_writable(run_path.parent)  # creates nothing: a run that fails before training leaves no trace
    config = {"kind": recipe.kind, **as_dict(data_cfg, augment_cfg, recipe.model_config, train_cfg)}
    config["data"].pop("cache")  # where decoded pixels are kept is not what the run is: resuming may change it
    config["train"].pop("jit_compile")  # nor is how the training step is compiled (manifest "precision" records it)
    if train_cfg.precision == precision.FLOAT32:  # float32 runs keep the identity they had before --precision
        config["train"].pop("precision")
    model_part = config.get("model", {})
    if model_part.get("unfreeze_schedule", None) == "":  # runs without a schedule or layer decay keep their identity
        model_part.pop("unfreeze_schedule")
    if model_part.get("layer_decay", None) == 1.0:
        model_part.pop("layer_decay")

    t0 = time.perf_counter()
    # A folder is decoded at the size the model takes (a backbone's resolved --image-size), so that size becomes the
    # run's input size (manifest "input"); datasets with a native size keep it and the model resizes in-graph.
    dataset = load_dataset(data_cfg, image_size=getattr(recipe.model_config, "image_size", None))
    data_seconds = time.perf_counter() - t0
    decode = dataset.info.get("decode")
    shape = (f"native {dataset.native_shape}" if decode is None else
             f"files decoded at {decode['size']}x{decode['size']} ({decode['chosen_by']}; cache {decode['cache']})")
    print(
        f"data: {dataset.name} — {len(dataset.classes)} classes, {shape}, "
        f"train {len(dataset.train.y)} / val {len(dataset.val.y)} / test {len(dataset.test.y)}"
    )
    from transfer import class_weights

    # Resolved before the run directory is claimed: a FILE naming unknown classes leaves nothing behind.
    weights = class_weights.resolve(train_cfg.class_weight, dataset.classes, dataset.train.y)
    if weights.identity() is None:
        config["train"].pop("class_weight", None)
    else:
        config["train"]["class_weight"] = weights.identity()
        print(f"class weights ({weights.source}): "
              + ", ".join(f"{name} {w:.3g}" for name, w in weights.weights.items()))

    import keras

    keras.utils.set_random_seed(train_cfg.seed)
    t0 = time.perf_counter()
    with strategy.scope(), precision.dtype_policy(train_cfg.precision):  # the policy applies to this build only
        built = recipe.build(dataset)
    model = built.model
    build_seconds = time.perf_counter() - t0

    status = rundir.prepare(run_path, config, overwrite=run_cfg.overwrite, write=chief)
    if status == "complete":
        manifest = rundir.read_json(run_path / rundir.MANIFEST)
        print(f"run '{run_path.name}' is already complete (test accuracy "
              f"{manifest['metrics']['test_accuracy']:.4f}); pass --overwrite to train it again")
        return run_path
    if chief and run_cfg.options:
        from transfer.options import write_options

        write_options(run_path / "config.toml", run_cfg.command, dict(run_cfg.options))
    if chief:
        rundir.write_json(run_path / "dataset.json", {"name": dataset.name, "classes": dataset.classes,
                                                      "fingerprint": dataset.fingerprint(), "info": dataset.info})

    from transfer import plots
    from transfer.evaluate import evaluate, pad_to_batches
    from transfer.train import read_history, train

    replicas = strategy.num_replicas_in_sync
    if replicas > 1:
        if train_cfg.batch_size % replicas:
            raise UserError(f"--batch-size {train_cfg.batch_size} must be a multiple of the {replicas} replicas")
        # Replicas need equal shares of every batch: validation repeats a few samples to fill its last batch,
        # training drops its last partial batch (reshuffled every epoch), the test evaluation pads and trims.
        padded = dataclasses.replace(dataset, val=pad_to_batches(dataset.val, train_cfg.batch_size))
    train_stream, val_ds, steps = training_pipelines(padded if replicas > 1 else dataset, augment_cfg, train_cfg,
                                                     class_weights=weights, replicas=replicas)
    val_ds = shard_by_data(val_ds)

    def train_ds(first_epoch: int):
        return shard_by_data(train_stream(first_epoch))

    num_classes = len(dataset.classes)
    result = train(model, built.set_trainable, train_ds=train_ds, val_ds=val_ds, steps_per_epoch=steps,
                   num_classes=num_classes, cfg=train_cfg, unfreeze=built.unfreeze,
                   run_path=run_path, strategy=strategy, writer=chief, schedule=built.schedule,
                   lr_factors=built.lr_factors)

    from transfer.freezing import count_params, freeze_batchnorm

    freeze_batchnorm(model)  # training is over: inference-mode BatchNorm in model.keras and every export
    precision_record = {"policy": train_cfg.precision, "device": device, "jit_compile": bool(model.jit_compile),
                        "jit_compile_requested": train_cfg.jit_compile,
                        "training_compute_dtypes": precision.compute_dtypes(model),
                        "variable_dtypes": precision.variable_dtypes(model),
                        "output_dtype": str(model.output.dtype), "loss_scaling": precision.loss_scaling(model)}
    if train_cfg.precision != precision.FLOAT32:
        # What ships is float32: the test set is scored in the training precision for the record, then every layer
        # computes in float32 (same float32 variables) for evaluation.json, model.keras, plots and exports.
        mixed = evaluate(model, dataset.test, dataset.classes, train_cfg.batch_size, pad_batches=replicas > 1)
        precision_record["test_accuracy_in_training_precision"] = mixed["accuracy"]
        precision.to_float32(model)
    precision_record["saved_compute_dtypes"] = precision.compute_dtypes(model)
    t0 = time.perf_counter()
    evaluation = evaluate(model, dataset.test, dataset.classes, train_cfg.batch_size, pad_batches=replicas > 1)
    eval_seconds = time.perf_counter() - t0
    evaluation["split"] = "test"
    if not chief:
        print(f"worker done: test accuracy {evaluation['accuracy']:.4f}; the chief writes {run_path}")
        barrier(strategy)
        return run_path
    rundir.write_json(run_path / rundir.EVALUATION, evaluation)
    tmp_model = run_path / "tmp-model.keras"
    # The model without its optimizer state: what evaluation, export and serving need (a third of the file for Adam).
    # (single tensors, not one-element lists: the exported serving signature must take the batch itself)
    keras.Model(model.input, model.output, name=model.name).save(tmp_model)
    os.replace(tmp_model, run_path / rundir.MODEL)
    title = run_path.name
    plots.plot_history(read_history(run_path / rundir.HISTORY), run_path / "plots", title)
    plots.plot_confusion(evaluation["confusion_matrix"], dataset.classes, run_path / "plots" / "confusion.png",
                         f"{title}: test confusion")
    _gradcam_plot(model, dataset, run_path / "plots", title)

    final_phase = result.phases[-1] if result.phases else {}
    manifest = {
        "manifest_version": rundir.MANIFEST_VERSION,
        "status": "complete",
        "kind": recipe.kind,
        "name": run_path.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "options": dict(run_cfg.options),
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(),
                    "sizes": {s: len(getattr(dataset, s).y) for s in ("train", "val", "test")}},
        "classes": dataset.classes,
        "class_weight": weights.record(),
        "input": _input_spec(dataset.native_shape),
        "model": {
            "file": rundir.MODEL,
            "size_bytes": (run_path / rundir.MODEL).stat().st_size,
            "params": count_params(model.weights),
            "trainable_params": final_phase.get("trainable_params", count_params(model.trainable_weights)),
            **built.described,
        },
        "precision": precision_record,
        "phases": result.phases,
        "trainable_layers": final_phase.get("trainable_backbone_layers", []),
        "metrics": {
            "test_accuracy": evaluation["accuracy"],
            "test_top5_accuracy": evaluation.get("top5_accuracy"),
            "test_balanced_accuracy": evaluation["balanced_accuracy"],
            "test_macro_f1": evaluation["macro_f1"],
            "test_loss": evaluation["loss"],
            "best_val_accuracy": result.best_val_accuracy,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
        },
        "timings": {
            "data_seconds": round(data_seconds, 3),
            "build_seconds": round(build_seconds, 3),
            "train_seconds": round(result.train_seconds, 3),
            "eval_seconds": round(eval_seconds, 3),
            "this_invocation_seconds": round(time.perf_counter() - started, 3),
        },
        "versions": library_versions(),
    }
    rundir.write_json(run_path / rundir.MANIFEST, manifest)
    barrier(strategy)
    if not run_cfg.keep_checkpoints:  # a complete run never resumes: its weight checkpoints are dead weight
        from transfer.train import BEST, LAST, RNG

        for name in (LAST, RNG, BEST):
            (run_path / "checkpoints" / name).unlink(missing_ok=True)
    top5 = evaluation.get("top5_accuracy")
    print(
        f"\ndone: test accuracy {evaluation['accuracy']:.4f}, balanced accuracy "
        f"{evaluation['balanced_accuracy']:.4f}, macro-F1 {evaluation['macro_f1']:.4f}"
        + (f", top-5 {top5:.4f}" if top5 is not None else "")
        + f" (best val_accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch}, "
        f"{result.epochs_run} epochs, {result.train_seconds:.0f}s training)\n"
        f"run directory: {run_path}\n"
        f"  model.keras, manifest.json, evaluation.json, history.csv, plots/"
        + (f", logs/ (tensorboard --logdir {run_path / 'logs'})" if train_cfg.tensorboard else "")
    )
    for line in end_warnings(manifest, evaluation):
        print(line, file=sys.stderr)
    return run_path


def end_warnings(manifest: dict, evaluation: dict) -> list[str]:
    """The one-line warnings a finished run ends with: a random backbone left partly frozen, and a test accuracy
    that is not above chance (exact binomial test against always answering the commonest test class)."""
    from transfer.compare.stats import ALPHA, p_above_chance

    lines = []
    model = manifest["model"]
    if model.get("backbone") and model.get("weights") == "none" and model.get("unfreeze") != "all":
        lines.append(f"warning: the backbone is random (--weights none) and partly frozen (--unfreeze "
                     f"{model.get('unfreeze')}): its frozen layers compute random features; use pretrained weights "
                     "(`transfer backbones` lists what this machine has) or --unfreeze all")
    n = int(evaluation.get("samples") or 0)
    supports = [int(m.get("support", 0)) for m in (evaluation.get("per_class") or {}).values()]
    if n and supports:
        chance = max(supports) / n
        correct = round(evaluation["accuracy"] * n)
        if p_above_chance(correct, n, chance) >= ALPHA:
            lines.append(f"warning: test accuracy {evaluation['accuracy']:.4f} is not above chance ({chance:.4f}, "
                         f"always answering the commonest class; {correct} of {n} right): this model learned "
                         "nothing usable; check the data, the learning rate and the frozen layers")
    return lines


def _gradcam_plot(model, dataset, out: Path, title: str) -> None:
    """``plots/gradcam.png`` (a few test images per class, misclassified first); a diagnostic figure, so a failure
    to draw it is one note, never a failed run."""
    from transfer.explain import GRADCAM_PLOT, report_gradcam

    try:
        report_gradcam(model, dataset.test, dataset.classes, out / GRADCAM_PLOT, title)
    except Exception as exc:  # the model, evaluation and other plots are written already
        print(f"note: no {GRADCAM_PLOT} ({type(exc).__name__}: {str(exc).strip()[:200]})")


def training_pipelines(dataset, augment_cfg, train_cfg: TrainConfig, class_weights=None, replicas: int = 1):
    """The training stream factory, the validation pipeline (labels one-hot) and the steps per epoch.

    ``train(first_epoch)`` is the endless stream of training batches from that epoch on
    (:func:`transfer.data.pipeline.training_stream`): every epoch a pure function of (seed, epoch), so a resumed
    run sees the batches the uninterrupted one would have. ``class_weights`` (a
    :class:`transfer.class_weights.ClassWeights` other than none) adds a per-sample weight to every training batch,
    the weight of its label: Keras' ``class_weight`` as part of the pipeline, so it works under every strategy
    (rebatched and sharded alike). With ``replicas`` > 1 each epoch is rebatched to whole global batches, dropping
    its last partial one (replicas need equal shares). Validation stays unweighted.
    """
    import tensorflow as tf

    from transfer.data import make_pipeline
    from transfer.data.pipeline import training_stream

    num_classes = len(dataset.classes)
    table = None
    if class_weights is not None and class_weights.source != "none":
        table = tf.constant(class_weights.vector(dataset.classes), tf.float32)

    def finish(epoch_ds):
        epoch_ds = epoch_ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)))
        if table is not None:
            epoch_ds = epoch_ds.map(lambda x, y: (x, y, tf.gather(table, tf.argmax(y, axis=-1))))
        if replicas > 1:
            epoch_ds = epoch_ds.rebatch(train_cfg.batch_size, drop_remainder=True)
        return epoch_ds

    train = training_stream(dataset.train, batch_size=train_cfg.batch_size, augment=augment_cfg,
                            seed=train_cfg.seed, finish=finish)

    val_ds = make_pipeline(dataset.val, batch_size=train_cfg.batch_size, training=False)
    val_ds = val_ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)))
    samples = len(dataset.train.y)
    steps = samples // train_cfg.batch_size if replicas > 1 else -(-samples // train_cfg.batch_size)
    if steps == 0:  # an epoch without a batch: the endless stream would never yield one
        if not samples:
            raise UserError("the training split has no images; add images or lower --val-split/--test-split")
        raise UserError(f"the training split has {samples} images, fewer than one global batch of "
                        f"{train_cfg.batch_size} (the {replicas} replicas drop partial batches); lower --batch-size")
    return train, val_ds, steps


def reevaluate(run_path: Path, split: str = "test", *, trust_hub: bool = False) -> dict:
    """Load a complete run's model, rebuild its data split from the stored config and evaluate again.

    The model is loaded first, by the one safe loader (:func:`transfer.runmodel.load_run_model`; ``trust_hub`` is
    ``--trust-hub-handle``), so a refused model costs no data loading. Refuses when the rebuilt split differs from
    the one the run was trained on (dataset fingerprint).
    """
    from transfer.data import load_run_dataset
    from transfer.evaluate import evaluate
    from transfer.runmodel import load_run_model

    manifest = rundir.load_complete(run_path)
    model = load_run_model(run_path, trust_hub=trust_hub)
    dataset = load_run_dataset(manifest, run_path)
    evaluation = evaluate(model, getattr(dataset, split), dataset.classes, manifest["config"]["train"]["batch_size"])
    evaluation["split"] = split
    if split == "test":
        rundir.write_json(run_path / rundir.EVALUATION, evaluation)
    return evaluation
