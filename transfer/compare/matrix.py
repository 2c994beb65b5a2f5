"""The matrix of a comparison: its config file, the cells it expands to, and the settings resolved once.

Settings are layered once, here: the config dataclasses' defaults (compare's own shared augmentation default is
``none``), then the config file, then the flags given. The result is a :class:`CompareSettings` object that the
command and the pipeline hand to :func:`transfer.compare.cli.run_compare`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from transfer import rundir
from transfer.config import (
    AugmentConfig,
    CellConfig,
    CompareConfig,
    DataConfig,
    MatrixConfig,
    TrainConfig,
)
from transfer.errors import UserError
from transfer.options import Table, build, given, read_config

# Fair by default: only baselines whose identity is augmentation augment; every other cell shares this.
DEFAULT_AUGMENT = AugmentConfig(preset="none")
TABLES = (
    Table("data", DataConfig),
    Table("augment", AugmentConfig),
    Table("train", TrainConfig),
    Table("matrix", MatrixConfig, array=True),
    Table("cells", CellConfig, array=True),
)
MATRIX_FLAGS = ("baselines", "backbones", "unfreeze", "image_sizes")  # --weights/--head are CompareConfig's


@dataclass(frozen=True)
class Cell:
    """One model of the matrix: a baseline, or a backbone at an image size and unfreeze setting."""

    name: str
    kind: str  # baseline | finetune
    model: str  # baseline name or backbone name
    image_size: int | None = None
    unfreeze: str = "0"
    weights: str = "imagenet"
    head: str = "default"


@dataclass(frozen=True)
class CompareSettings:
    """Everything a comparison needs, resolved: shared data/augmentation/training, the cells, the top level."""

    top: CompareConfig
    data: DataConfig
    augment: AugmentConfig
    train: TrainConfig
    cells: tuple[Cell, ...]
    strategy: str = "auto"
    overwrite: bool = False
    config_file: str | None = None
    extra: dict = field(default_factory=dict)  # tables other commands registered (pipeline: export, bench)


def load_config(path: str | Path, extra_tables: tuple[Table, ...] = ()) -> dict:
    """A compare config file, every key and type checked (see transfer.options.read_config)."""
    return read_config(path, CompareConfig, TABLES + extra_tables)


def _finetune_cell(backbone: str, size: int | None, unfreeze, weights: str, head: str,
                   name: str | None = None) -> Cell:
    from transfer.backbones import get_backbone, short_name
    from transfer.freezing import parse_unfreeze

    spec = get_backbone(backbone)
    size = spec.resolve_size(size)
    unfreeze = parse_unfreeze(unfreeze).text
    shown = short_name(spec.name)  # a Hub handle by its last meaningful part, not a whole path
    weights_part = "" if weights == "imagenet" else "-" + rundir.slug(weights.rstrip("/").split("/")[-1])
    name = name or rundir.slug(f"{shown}-{size}px-u{unfreeze}") + weights_part
    return Cell(name, "finetune", spec.name, size, unfreeze, weights, head)


def expand_matrix(matrices: list, cells: list, *, weights: str, head: str) -> list[Cell]:
    """Cells of every matrix (baselines, and backbones x image sizes x unfreeze) plus explicit cells.

    ``matrices`` and ``cells`` hold MatrixConfig/CellConfig objects or their field dicts. Unknown model names
    (closest match) and duplicate cell names are one-line errors.
    """
    from transfer.baselines import get_baseline

    out: list[Cell] = []
    for m in matrices:
        m = m if isinstance(m, MatrixConfig) else build(MatrixConfig, m, "the matrix")
        m_weights, m_head = m.weights or weights, m.head or head
        for name in m.baselines:
            out.append(Cell(get_baseline(name).name, "baseline", name, weights="none"))
        for backbone in m.backbones:
            for size in m.image_sizes or [None]:
                for unfreeze in m.unfreeze or ["0"]:
                    out.append(_finetune_cell(backbone, size, unfreeze, m_weights, m_head))
    for c in cells:
        c = c if isinstance(c, CellConfig) else build(CellConfig, c, "the cells")
        if (c.baseline is None) == (c.backbone is None):
            raise UserError(f"config cell {c.name or ''!r} needs exactly one of 'baseline' or 'backbone'")
        if c.baseline is not None:
            row = get_baseline(c.baseline)
            out.append(Cell(c.name or row.name, "baseline", row.name, weights="none"))
        else:
            out.append(_finetune_cell(c.backbone, c.image_size, c.unfreeze, c.weights or weights, c.head or head,
                                      c.name))
    if not out:
        raise UserError("the comparison has no cells; pass --baselines and/or --backbones, or --config FILE")
    seen: set[str] = set()
    for cell in out:
        if cell.name in seen:
            raise UserError(f"duplicate cell name '{cell.name}' in the comparison; give each cell a unique name")
        seen.add(cell.name)
    return out


def resolve_settings(config: dict | None, args: argparse.Namespace | None = None, *,
                     config_file: str | None = None) -> CompareSettings:
    """Defaults, then ``config`` (a :func:`load_config` result), then the flags given in ``args``, resolved once."""
    config = config or {"top": {}, "data": {}, "augment": {}, "train": {}, "matrix": [], "cells": []}
    flags = args if args is not None else argparse.Namespace()
    matrix_flags = {k: v for k, v in given(flags, MatrixConfig).items() if k in MATRIX_FLAGS}
    if (config["matrix"] or config["cells"]) and matrix_flags:
        raise UserError("pass the matrix either in --config or as --baselines/--backbones/--unfreeze/--image-sizes")
    top = build(CompareConfig, {**config["top"], **given(flags, CompareConfig)}, "the compare options")
    train = build(TrainConfig, {**config["train"], **given(flags, TrainConfig)}, "the training options")
    data = build(DataConfig, {**config["data"], **given(flags, DataConfig), "seed": train.seed}, "the data options")
    augment = build(AugmentConfig, {**config["augment"], **given(flags, AugmentConfig)}, "the augmentation options",
                    base=DEFAULT_AUGMENT)
    augment.resolved()
    matrices = config["matrix"] or ([matrix_flags] if matrix_flags else [])
    cells = expand_matrix(matrices, config["cells"], weights=top.weights, head=top.head)
    extra = {k: v for k, v in config.items() if k not in {"top", *(t.name for t in TABLES)}}
    return CompareSettings(top, data, augment, train, tuple(cells), strategy=getattr(flags, "strategy", None) or "auto",
                           overwrite=bool(getattr(flags, "overwrite", False)), config_file=config_file, extra=extra)
