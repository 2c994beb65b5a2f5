"""``transfer baselines`` (list the scratch models) and ``transfer baseline --model NAME`` (train one)."""

from __future__ import annotations

import dataclasses

# Flags whose default comes from --protocol; argparse leaves them None unless the user gives them.
PROTOCOL_FLAGS = ("optimizer", "batch_size", "epochs", "patience")
AUGMENT_FLAGS = ("flip", "rotation", "zoom", "shift", "contrast", "brightness")


def register(subparsers) -> None:
    """Add the ``baselines`` and ``baseline`` sub-commands."""
    from transfer.baselines import PROTOCOLS
    from transfer.cli import add_data_args, add_run_args, add_train_args

    p = subparsers.add_parser("baselines", help="list the scratch baselines from the seeds, with parameter counts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_baselines)

    p = subparsers.add_parser(
        "baseline", help="train a scratch baseline (same run directory as finetune)",
        description="Train a scratch CNN from the seeds. --optimizer, --batch-size, --epochs, --patience and the "
        "augmentation default to --protocol's values (a baseline's own augmentation, e.g. vgg3-aug's, included); "
        "flags given explicitly win.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, help="baseline name (see `transfer baselines`)")
    m.add_argument("--protocol", default="seeds",
                   help=f"training recipe: {' | '.join(PROTOCOLS)} (seeds: batch 64, up to 100 epochs, patience 5; "
                   "aug87: Adam, batch 256, 250 epochs, the 87.21%% model's augmentation)")
    add_data_args(p)
    add_train_args(p)
    add_run_args(p)
    p.set_defaults(func=cmd_baseline, augment=None, **{flag: None for flag in PROTOCOL_FLAGS})


def resolve_protocol(args, baseline):
    """Fill unset protocol flags on ``args`` in place; return the augmentation config the run uses."""
    from transfer.baselines import protocol_settings
    from transfer.data import AugmentConfig

    settings = protocol_settings(args.protocol, baseline)
    for flag in PROTOCOL_FLAGS:
        if getattr(args, flag) is None:
            setattr(args, flag, settings[flag])
    overrides = {op: getattr(args, op) for op in AUGMENT_FLAGS if getattr(args, op) is not None}
    if "flip" in overrides:
        overrides["flip"] = overrides["flip"] == "on"
    base = settings["augment"] if args.augment is None else AugmentConfig(preset=args.augment)
    augment = dataclasses.replace(base, **overrides)
    augment.resolved()
    args.augment = augment.preset  # keeps shared_configs' own checks meaningful
    return augment


def cmd_baseline(args) -> int:
    from transfer.baselines import BaselineConfig, baseline_recipe, get_baseline
    from transfer.cli import shared_configs
    from transfer.runner import execute

    row = get_baseline(args.model)
    augment = resolve_protocol(args, row)
    data, _, train, run = shared_configs(args)
    train = dataclasses.replace(train, head_epochs=0)  # one phase: nothing to warm up without a backbone
    recipe = baseline_recipe(BaselineConfig(row.name, args.protocol), data.dataset, train.seed)
    execute(recipe, data, augment, train, run)
    return 0


def cmd_baselines(args) -> int:

    from transfer.baselines import table_rows
    from transfer.cli import print_rows

    rows = table_rows((32, 32, 3))
    for r in rows:
        r["params_text"] = f"{r['params']:,}" if r["params"] is not None else "n/a"
    print_rows(rows, [("name", "name", "<21"), ("params_text", "params (32x32x3)", ">17"), ("min_size", "min", ">4"),
                      ("augment", "augmentation", "<34"), ("description", "description", "")],
               as_json=args.json, json_keys=[k for k in rows[0] if k != "params_text"])
    if args.json:
        return 0
    print("train one: transfer baseline --model NAME [--protocol seeds|aug87]; compare: transfer compare --baselines")
    return 0
