"""``transfer baselines`` (list the scratch models) and ``transfer baseline --model NAME`` (train one)."""

from __future__ import annotations

import dataclasses

from transfer.options import add_data_args, add_run_args, add_train_args

# Flags whose default comes from --protocol; argparse leaves them None unless the user gives them.
PROTOCOL_FLAGS = ("optimizer", "batch_size", "epochs", "patience")


def register(subparsers) -> None:
    """Add the ``baselines`` and ``baseline`` sub-commands."""
    from transfer.baselines import PROTOCOLS

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
    m.add_argument("--model", help="baseline name (see `transfer baselines`); required")
    m.add_argument("--protocol", default="seeds",
                   help=f"training recipe: {' | '.join(PROTOCOLS)} (seeds: batch 64, up to 100 epochs, patience 5; "
                   "aug87: Adam, batch 256, 250 epochs, the 87.21%% model's augmentation) (default: seeds)")
    from_protocol = {name: "--protocol's" for name in (*PROTOCOL_FLAGS, "preset")}
    add_data_args(p, unset=True, default_texts=from_protocol)
    add_train_args(p, unset=True, default_texts=from_protocol)
    add_run_args(p)
    p.set_defaults(func=cmd_baseline)


def cmd_baseline(args) -> int:
    from transfer.baselines import BaselineConfig, baseline_recipe, get_baseline, protocol_settings
    from transfer.config import TrainConfig
    from transfer.errors import UserError
    from transfer.options import replay_options, shared_configs
    from transfer.runner import execute

    if not args.model:
        raise UserError("transfer baseline needs --model NAME (see `transfer baselines`)")
    row = get_baseline(args.model)
    settings = protocol_settings(args.protocol, row)
    # A preset given on the command line starts from the plain preset; otherwise the protocol's augmentation.
    augment_base = settings["augment"] if args.augment is None else None
    train_base = TrainConfig(**{flag: settings[flag] for flag in PROTOCOL_FLAGS})
    data, augment, train, run = shared_configs(args, augment=augment_base, train=train_base)
    train = dataclasses.replace(train, head_epochs=0)  # one phase: nothing to warm up without a backbone
    recipe = baseline_recipe(BaselineConfig(row.name, args.protocol), data.dataset, train.seed)
    options = replay_options(data, augment, train, run, extra={"model": row.name, "protocol": args.protocol})
    execute(recipe, data, augment, train, dataclasses.replace(run, options=tuple(sorted(options.items()))))
    return 0


def cmd_baselines(args) -> int:

    from transfer.baselines import table_rows
    from transfer.render import print_rows

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
