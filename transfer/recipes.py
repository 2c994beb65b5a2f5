"""Run recipes: what a kind of run (fine-tune, baseline) builds, checked before anything trains."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from transfer import rundir
from transfer.config import ModelConfig
from transfer.errors import UserError


@dataclass
class BuiltRun:
    """A recipe's build result: the model, the backbone layer whose layers unfreeze, and facts for the manifest."""

    model: object
    backbone: object
    described: dict
    hub: bool = False
    pretrained: bool = True
    unfreeze: object = None  # the recipe's Unfreeze resolved for this backbone (blocks:N as layers); None: as is


@dataclass
class ModelRecipe:
    """What a kind of run (fine-tune, baseline) contributes: a checked build step and its description."""

    kind: str
    build: Callable  # (dataset) -> BuiltRun
    default_name: str
    unfreeze: object  # transfer.freezing.Unfreeze
    model_config: object


def finetune_recipe(model_cfg: ModelConfig, dataset: str, seed: int = 0) -> ModelRecipe:
    """Validate a fine-tuning model config cheaply (no TensorFlow yet) and return its recipe."""
    from transfer.backbones import check_image_size, get_backbone
    from transfer.freezing import parse_unfreeze, validate_unfreeze
    from transfer.heads import parse_head

    spec = get_backbone(model_cfg.backbone)
    head = parse_head(model_cfg.head)
    unfreeze = parse_unfreeze(model_cfg.unfreeze)
    size = model_cfg.image_size or spec.default_size
    check_image_size(spec, size)
    if spec.is_hub:
        validate_unfreeze(None, unfreeze, spec.name, hub=True)
    if model_cfg.weights not in ("imagenet", "none") and not spec.is_hub and not os.path.isfile(model_cfg.weights):
        raise UserError(f"--weights '{model_cfg.weights}' is not a file; pass imagenet, none or a weights file path")
    model_cfg = dataclasses.replace(model_cfg, image_size=size, head=head.text, unfreeze=unfreeze.text)

    def build(dataset):
        from transfer.model import build_model

        built = build_model(model_cfg.backbone, input_shape=dataset.native_shape, num_classes=len(dataset.classes),
                            head=head, image_size=size, weights=model_cfg.weights)
        resolved = validate_unfreeze(built.backbone, unfreeze, spec.name, hub=spec.is_hub, block_of=spec.block_of)
        described = {
            "backbone": spec.name,
            "batchnorm": "frozen (inference mode)" if built.pretrained else "trainable (from scratch)",
            "backbone_layer": built.backbone.name,
            "weights": model_cfg.weights,
            "image_size": size,
            "preprocessing": spec.preprocessing,
            "head": head.text,
            "unfreeze": unfreeze.text,
        }
        if resolved.blocks is not None:
            described["unfreeze_layers"] = resolved.count
        if unfreeze.frozen_backbone and not built.pretrained:
            print("warning: --weights none with --unfreeze 0 trains a head on a random, frozen backbone; "
                  "use --unfreeze all to train it from scratch", file=sys.stderr)
        return BuiltRun(built.model, built.backbone, described, hub=spec.is_hub, pretrained=built.pretrained,
                        unfreeze=resolved)

    return ModelRecipe("finetune", build, default_run_name(spec.name, dataset, seed, f"{size}px", f"u{unfreeze.text}"),
                       unfreeze, model_cfg)


def default_run_name(model: str, dataset: str, seed: int, *parts: str) -> str:
    """``<model>_<dataset>_<parts...>[_s<seed>]``: the same command always names the same run."""
    model = model.rstrip("/").split("/")[-1] if model.startswith("hub:") else model
    dataset = dataset.rstrip("/").split("/")[-1] if dataset.startswith("folder:") else dataset
    bits = [model, dataset, *parts] + ([f"s{seed}"] if seed else [])
    return "_".join(rundir.slug(b) for b in bits)
