"""Run recipes: what a kind of run (fine-tune, baseline) builds, checked before anything trains.

A recipe is resolved when it is made: its ``model_config`` holds the values the run really uses (an integer image
size, the canonical ``--unfreeze`` text), and the :class:`BuiltRun` its ``build`` returns carries the one resolved
:class:`~transfer.freezing.Unfreeze` and the function that applies an unfreeze setting to the model, so training
needs no knowledge of backbone kinds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from transfer import rundir
from transfer.config import ModelConfig
from transfer.errors import UserError


@dataclass
class BuiltRun:
    """A recipe's build result: the model, how training unfreezes it, and facts for the manifest.

    ``unfreeze`` is always set: the recipe's setting resolved for this model (``blocks:N`` as a layer count;
    ``all`` for a model without a backbone). ``set_trainable(unfreeze) -> trainable layer names`` applies a
    phase's setting to the backbone; None means the model has no backbone and every layer trains.
    """

    model: object
    described: dict
    unfreeze: object  # transfer.freezing.Unfreeze
    set_trainable: Callable | None = None
    schedule: tuple = ()  # --unfreeze-schedule steps (transfer.freezing.ScheduleStep), blocks:N resolved
    lr_factors: Callable | None = None  # --layer-decay: () -> ({id(variable): factor}, {block: factor},
    #                                                          {layer name: its block or None above the top block})


@dataclass
class ModelRecipe:
    """What a kind of run (fine-tune, baseline) contributes: a checked build step and its resolved config."""

    kind: str
    build: Callable  # (dataset) -> BuiltRun
    default_name: str
    model_config: object  # resolved: what the run really uses, as recorded in config.json


def finetune_recipe(model_cfg: ModelConfig, dataset: str, seed: int = 0) -> ModelRecipe:
    """Validate a fine-tuning model config cheaply (no TensorFlow yet) and return its resolved recipe."""
    from transfer.backbones import get_backbone, weights_run
    from transfer.freezing import ScheduleStep, parse_schedule, parse_unfreeze
    from transfer.heads import parse_head
    from transfer.pretrained import packaged, provenance

    spec = get_backbone(model_cfg.backbone)
    head = parse_head(model_cfg.head)
    unfreeze = parse_unfreeze(model_cfg.unfreeze)
    size = spec.resolve_size(model_cfg.image_size)
    spec.check_unfreeze(unfreeze)
    schedule = parse_schedule(model_cfg.unfreeze_schedule, unfreeze.text)
    for step in schedule:
        spec.check_unfreeze(step.unfreeze)
    spec.check_weights(model_cfg.weights)
    model_cfg = dataclasses.replace(model_cfg, image_size=size, head=head.text, unfreeze=unfreeze.text,
                                    unfreeze_schedule=",".join(step.text for step in schedule),
                                    layer_decay=float(model_cfg.layer_decay))
    decay = model_cfg.layer_decay

    def build(dataset):
        from transfer.model import build_model

        built = build_model(spec, input_shape=dataset.native_shape, num_classes=len(dataset.classes), head=head,
                            image_size=size, weights=model_cfg.weights)
        resolved = spec.resolve_unfreeze(built.backbone, unfreeze)
        from transfer.freezing import backbone_layers, block_lr_factors, check_resolved_schedule

        steps = tuple(ScheduleStep(step.epoch, spec.resolve_unfreeze(built.backbone, step.unfreeze))
                      for step in schedule)
        check_resolved_schedule(resolved, steps)
        lr_factors = None
        if decay != 1.0:
            per_layer, per_block, member = block_lr_factors(built.backbone, spec.block_of, decay)
            if not per_block:
                raise UserError(f"--layer-decay {decay:g}: no blocks are known for {spec.name}; use --layer-decay 1")
            by_variable = {id(w): per_layer[layer.name] for layer in backbone_layers(built.backbone)
                           for w in layer.weights}

            def decay_factors():
                return by_variable, per_block, member

            lr_factors = decay_factors
        described = {
            "backbone": spec.name,
            "batchnorm": "frozen (inference mode)" if built.pretrained else "trainable (from scratch)",
            "backbone_layer": built.backbone.name,
            "weights": model_cfg.weights,
            "image_size": size,
            "preprocessing": spec.preprocessing,
            "head": head.text,
            "unfreeze": unfreeze.text,
            **spec.facts(built.backbone),
        }
        row = packaged(spec.name, model_cfg.weights)
        if row is not None:  # weights inside a package: which one, its version, the file's sha256, its licence
            described["weights_package"] = provenance(row)
        run = weights_run(model_cfg.weights)
        if run is not None:  # started from an earlier run's backbone: which run, and the data it learned from
            source = rundir.load_complete(run)
            described["weights_source"] = {"run": source["name"], "path": str(run.resolve()),
                                           "dataset": source["dataset"]["name"],
                                           "dataset_fingerprint": source["dataset"]["fingerprint"]}
        if resolved.blocks is not None:
            described["unfreeze_layers"] = resolved.count
        if schedule:
            described["unfreeze_schedule"] = [{"epoch": step.epoch, "unfreeze": step.unfreeze.text,
                                               "layers": None if step.unfreeze.all else step.unfreeze.count}
                                              for step in steps]
        if lr_factors is not None:
            described["layer_decay"] = decay
        return BuiltRun(built.model, described, unfreeze=resolved, set_trainable=built.set_trainable,
                        schedule=steps, lr_factors=lr_factors)

    parts = [f"{size}px", f"u{unfreeze.text}"]
    if schedule:  # a schedule or a decay changes what trains: its own default name ("blocks:1@2" -> "b1at2")
        parts.append("us" + "-".join(step.text.replace("blocks:", "b").replace("@", "at") for step in schedule))
    if decay != 1.0:
        parts.append(f"ld{decay:g}")
    name = default_run_name(spec.name, dataset, seed, *parts)
    return ModelRecipe("finetune", build, name, model_cfg)


def default_run_name(model: str, dataset: str, seed: int, *parts: str) -> str:
    """``<model>_<dataset>_<parts...>[_s<seed>]``: the same command always names the same run."""
    if model.startswith("keras_hub:"):
        from transfer.backbones import short_name

        model = short_name(model)
    model = model.rstrip("/").split("/")[-1] if model.startswith("hub:") else model
    dataset = dataset.rstrip("/").split("/")[-1] if dataset.startswith("folder:") else dataset
    bits = [model, dataset, *parts] + ([f"s{seed}"] if seed else [])
    return "_".join(rundir.slug(b) for b in bits)
