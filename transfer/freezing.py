"""Partial unfreezing: which backbone layers train in the fine-tuning phase.

``--unfreeze N`` means what the seed documents mean by ``for layer in base.layers[:-N]: layer.trainable
= False``: the last N layers of the backbone (input layer excluded) train, everything below stays frozen.
On VGG16, ``4`` unfreezes block5_conv1..3 and block5_pool. ``--unfreeze blocks:N`` counts architectural blocks
instead (the registry's block pattern: VGG's block5, ResNet's conv5_block3, MobileNetV2's block_16, ...): the last
N blocks and every layer above them train, so the same value means the same thing across backbones of one
family. BatchNormalization layers of a pretrained backbone stay frozen everywhere, and the backbone is called with
``training=False``, so their statistics never move. A backbone trained from scratch (``--weights none``) trains its
BatchNorm layers too.

Each backbone kind applies these its own way (``resolve_unfreeze``/``set_trainable`` in :mod:`transfer.backbones`):
Keras Applications models through the layer functions here, Hub modules whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transfer.errors import UserError

BLOCKS_PREFIX = "blocks:"


@dataclass(frozen=True)
class Unfreeze:
    """A parsed ``--unfreeze`` value: ``count`` layers from the top, every layer (``all``), or the last ``blocks``
    blocks (``blocks:N``, turned into a layer count for a given backbone by :func:`resolve_layer_count`)."""

    count: int | None  # None means all, unless blocks is set and not yet resolved
    text: str
    blocks: int | None = None

    @property
    def frozen_backbone(self) -> bool:
        return self.count == 0

    @property
    def all(self) -> bool:
        return self.count is None and self.blocks is None


def parse_unfreeze(text: str | int) -> Unfreeze:
    """Parse ``0``, ``N``, ``blocks:N`` or ``all``; anything else is a one-line :class:`UserError`."""
    text = str(text).strip().lower()
    if text == "all":
        return Unfreeze(None, "all")
    if text.startswith(BLOCKS_PREFIX):
        n = text[len(BLOCKS_PREFIX):]
        if not n.isdecimal() or int(n) < 1:
            raise UserError(f"--unfreeze '{text}': blocks:N needs a number of blocks N >= 1 (e.g. blocks:2)")
        return Unfreeze(None, f"{BLOCKS_PREFIX}{int(n)}", blocks=int(n))
    if not text.isdecimal():
        raise UserError(f"--unfreeze '{text}' is not 0, a positive number of layers, blocks:N, or 'all'")
    return Unfreeze(int(text), str(int(text)))


def backbone_layers(backbone) -> list:
    """The backbone's layers in order, without the input layer."""
    import keras

    return [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]


def is_batchnorm(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def resolve_layer_count(backbone, unfreeze: Unfreeze, name: str,
                        block_of: Callable[[str], str | None] | None = None) -> Unfreeze:
    """Refuse an unfreeze value a layered backbone cannot honour, before anything is written; return it with
    ``blocks:N`` resolved to the number of layers it covers on this backbone (``block_of`` names a layer's block)."""
    layers = backbone_layers(backbone)
    total = len(layers)
    if unfreeze.blocks is not None:
        return _resolve_blocks(layers, unfreeze, name, block_of)
    if unfreeze.count is not None and unfreeze.count > total:
        raise UserError(
            f"--unfreeze {unfreeze.count} exceeds {name}'s {total} layers; use 0..{total} or all"
        )
    return unfreeze


def _resolve_blocks(layers: list, unfreeze: Unfreeze, name: str, block_of) -> Unfreeze:
    """``blocks:N`` as a layer count: every layer after the end of the block below the top N blocks.

    Counting from the end of the block below (not from the first layer named like the N-th block) also covers
    architectures whose block pattern matches only a block's last layer, such as InceptionV3's ``mixedN``.
    """
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, layer in enumerate(layers):
        block = block_of(layer.name) if block_of else None
        if block is not None:
            first.setdefault(block, index)
            last[block] = index
    if not first:
        raise UserError(f"--unfreeze {unfreeze.text}: no blocks are known for {name}; give a layer count instead")
    blocks = sorted(first, key=first.get)
    n = unfreeze.blocks
    if n > len(blocks):
        raise UserError(f"--unfreeze {unfreeze.text} exceeds {name}'s {len(blocks)} blocks; "
                        f"use blocks:1..{len(blocks)} or all")
    start = last[blocks[-n - 1]] + 1 if n < len(blocks) else first[blocks[0]]
    return Unfreeze(len(layers) - start, unfreeze.text, n)


def set_layers_trainable(backbone, unfreeze: Unfreeze, freeze_bn: bool = True) -> list[str]:
    """Make the top layers of a layered ``backbone`` trainable (BatchNorm excluded unless ``freeze_bn`` is off, as
    for a backbone trained from scratch); return the names of the trainable weight-bearing layers.

    The caller must recompile the model afterwards for the change to take effect.
    """
    if unfreeze.frozen_backbone:
        backbone.trainable = False
        return []
    backbone.trainable = True
    layers = backbone_layers(backbone)
    top = layers if unfreeze.all else layers[len(layers) - unfreeze.count:]
    top_ids = {id(layer) for layer in top}
    trainable = []
    for layer in layers:
        layer.trainable = id(layer) in top_ids and not (freeze_bn and is_batchnorm(layer))
        if layer.trainable and layer.weights:
            trainable.append(layer.name)
    return trainable


def count_params(weights) -> int:
    """Number of scalars in a list of variables."""
    import numpy as np

    return int(sum(np.prod(w.shape) for w in weights))


def freeze_batchnorm(model) -> int:
    """After training: every BatchNormalization layer, nested models included, stops training for good.

    A backbone trained from scratch is called without ``training=False`` so its BatchNorm could learn; once
    training is over its statistics must never move again, and exporters (Keras ``model.export``) would otherwise
    trace such a nested BatchNorm with batch statistics, making exported predictions depend on the batch.
    Returns how many layers were frozen.
    """
    import keras

    frozen = 0
    stack = [model]
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            layer.trainable = False
            frozen += 1
        stack.extend(getattr(layer, "layers", []))
    return frozen


SCHEDULE_FLAG = "--unfreeze-schedule"


@dataclass(frozen=True)
class ScheduleStep:
    """One ``SPEC@E`` step of ``--unfreeze-schedule``: after ``epoch`` fine-tuning epochs, ``unfreeze`` applies."""

    epoch: int
    unfreeze: Unfreeze

    @property
    def text(self) -> str:
        return f"{self.unfreeze.text}@{self.epoch}"


def _unfreezes_more(before: Unfreeze, after: Unfreeze) -> bool | None:
    """Whether ``after`` trains strictly more than ``before``; None when only the built backbone can tell
    (a layer count against a block count)."""
    if before.all:
        return False
    if after.all or before.frozen_backbone:
        return True
    if before.blocks is not None and after.blocks is not None:
        return after.blocks > before.blocks
    if before.blocks is None and after.blocks is None:
        return after.count > before.count
    return None


def parse_schedule(text: str, start: str | int = "0") -> tuple[ScheduleStep, ...]:
    """Parse ``SPEC@E,SPEC@E,...`` (e.g. ``blocks:1@2,blocks:3@4,all@8``; E counts fine-tuning epochs done before
    the step, strictly increasing, >= 1); every step must unfreeze more than the one before (the first more than
    ``start``, the ``--unfreeze`` value). Anything else is a one-line :class:`UserError` naming the bad part."""
    text = str(text or "").strip().lower()
    if not text:
        return ()
    steps: list[ScheduleStep] = []
    before = parse_unfreeze(start)
    for part in (p.strip() for p in text.split(",")):
        spec, at, epoch = part.rpartition("@")
        if not at or not spec.strip():
            raise UserError(f"{SCHEDULE_FLAG} '{part}': each step is SPEC@EPOCH, e.g. blocks:1@2,all@8")
        if not epoch.strip().isdecimal() or int(epoch) < 1:
            raise UserError(f"{SCHEDULE_FLAG} '{part}': the epoch after @ must be a whole number >= 1 "
                            "(fine-tuning epochs done before the step)")
        try:
            unfreeze = parse_unfreeze(spec)
        except UserError:
            raise UserError(f"{SCHEDULE_FLAG} '{part}': '{spec.strip()}' is not a positive number of layers, "
                            "blocks:N or all") from None
        epoch = int(epoch)
        if steps and epoch <= steps[-1].epoch:
            raise UserError(f"{SCHEDULE_FLAG} '{part}': epochs must be strictly increasing "
                            f"(it follows '{steps[-1].text}')")
        if _unfreezes_more(before, unfreeze) is False:
            raise UserError(f"{SCHEDULE_FLAG} '{part}': {unfreeze.text} does not unfreeze more than "
                            f"{before.text}; a schedule only ever unfreezes more")
        steps.append(ScheduleStep(epoch, unfreeze))
        before = unfreeze
    return tuple(steps)


def check_resolved_schedule(start: Unfreeze, steps) -> None:
    """After ``blocks:N`` became layer counts on the built backbone: each step still unfreezes strictly more."""
    before = start
    for step in steps:
        after = step.unfreeze
        if before.all or (not after.all and (after.count or 0) <= (before.count or 0)):
            layers = {u: "all" if u.all else u.count for u in (before, after)}
            raise UserError(f"{SCHEDULE_FLAG} '{step.text}': {after.text} ({layers[after]} layers) does not "
                            f"unfreeze more than {before.text} ({layers[before]} layers) on this backbone")
        before = after


def block_lr_factors(backbone, block_of: Callable[[str], str | None] | None,
                     decay: float) -> tuple[dict[str, float], dict[str, float], dict[str, str | None]]:
    """``--layer-decay``: the learning-rate factor of every backbone layer (by name), of every block (top block
    first), and the block every layer counts in (None above the top block).

    The top block (and the layers above it) trains at the full rate, the block below at ``decay``, the next at
    ``decay**2``... A layer outside any block belongs to the block above it as ``blocks:N`` counts them (a block
    runs from after the previous block's last layer to its own last layer), so the stem takes the lowest block's
    rate. Without known blocks every layer keeps the full rate.
    """
    layers = backbone_layers(backbone)
    last: dict[str, int] = {}
    for index, layer in enumerate(layers):
        block = block_of(layer.name) if block_of else None
        if block is not None:
            last[block] = index
    order = sorted(last, key=last.get)  # bottom to top
    per_block = {block: decay ** (len(order) - 1 - i) for i, block in reversed(list(enumerate(order)))}
    per_layer: dict[str, float] = {}
    member: dict[str, str | None] = {}
    pointer = 0
    for index, layer in enumerate(layers):
        while pointer < len(order) and last[order[pointer]] < index:
            pointer += 1
        member[layer.name] = order[pointer] if pointer < len(order) else None
        per_layer[layer.name] = per_block[order[pointer]] if pointer < len(order) else 1.0
    return per_layer, per_block, member
