"""Run recipes: what a kind of run (fine-tune, baseline) builds, checked before anything trains.

A recipe is resolved when it is made: its ``model_config`` holds the values the run really uses (an integer image
size, the canonical ``--unfreeze`` text), and the :class:`BuiltRun` its ``build`` returns carries the one resolved
:class:`~transfer.freezing.Unfreeze` and the function that applies an unfreeze setting to the model, so training
needs no knowledge of backbone kinds.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass

from transfer import rundir
from transfer.config import ModelConfig


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
    from transfer.freezing import parse_unfreeze
    from transfer.heads import parse_head

    spec = get_backbone(model_cfg.backbone)
    head = parse_head(model_cfg.head)
    unfreeze = parse_unfreeze(model_cfg.unfreeze)
    size = spec.resolve_size(model_cfg.image_size)
    spec.check_unfreeze(unfreeze)
    spec.check_weights(model_cfg.weights)
    model_cfg = dataclasses.replace(model_cfg, image_size=size, head=head.text, unfreeze=unfreeze.text)

    def build(dataset):
        from transfer.model import build_model

        built = build_model(spec, input_shape=dataset.native_shape, num_classes=len(dataset.classes), head=head,
                            image_size=size, weights=model_cfg.weights)
        resolved = spec.resolve_unfreeze(built.backbone, unfreeze)
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
        run = weights_run(model_cfg.weights)
        if run is not None:  # started from an earlier run's backbone: which run, and the data it learned from
            source = rundir.load_complete(run)
            described["weights_source"] = {"run": source["name"], "path": str(run.resolve()),
                                           "dataset": source["dataset"]["name"],
                                           "dataset_fingerprint": source["dataset"]["fingerprint"]}
        if resolved.blocks is not None:
            described["unfreeze_layers"] = resolved.count
        if unfreeze.frozen_backbone and not built.pretrained:
            print("warning: --weights none with --unfreeze 0 trains a head on a random, frozen backbone; "
                  "use --unfreeze all to train it from scratch", file=sys.stderr)
        return BuiltRun(built.model, described, unfreeze=resolved, set_trainable=built.set_trainable)

    name = default_run_name(spec.name, dataset, seed, f"{size}px", f"u{unfreeze.text}")
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
