"""Command-line interface: ``transfer <command>``. Maps flags onto configs; nothing else reads flags."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from transfer import __version__
from transfer.distribute import STRATEGIES
from transfer.errors import UserError
from transfer.options import CONFIG_DEST, load_options, replay_options

# Other packages add their sub-commands here: each module has ``register(subparsers)``, which adds
# parsers whose ``func(args) -> int`` does the work (see cmd_finetune for the pattern).
COMMAND_MODULES: tuple[str, ...] = (
    "transfer.doctor",
    "transfer.baselines_cli",
    "export.cli",
    "transfer.compare",
    "serve.cli",
    "transfer.pipeline",
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like every other user error of the tool."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _quiet_tensorflow() -> None:
    """Import TensorFlow with stderr muted: its C++ start-up chatter would bury one-line errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic",
                   help="cifar10 | cifar100 | mnist | fashion_mnist | folder:PATH | synthetic (default: synthetic)")
    g.add_argument("--data-dir", help="pre-downloaded copy of a Keras dataset (air-gapped machines)")
    g.add_argument("--val-split", type=float, default=0.1, help="fraction of training data held out for validation")
    g.add_argument("--test-split", type=float, default=0.1,
                   help="fraction held out for test (folder datasets without a test/ sub-folder)")
    g.add_argument("--folder-image-size", type=int, default=64,
                   help="folder datasets: images are decoded and resized to this square size (default 64)")
    g.add_argument("--synthetic-train", type=int, default=2000, help="synthetic set: training images")
    g.add_argument("--synthetic-test", type=int, default=500, help="synthetic set: test images")
    g.add_argument("--limit-train", type=int, help="use a seeded, stratified subset of this many training images")
    a = parser.add_argument_group("augmentation (training split only)")
    a.add_argument("--augment", default="light", help="none | light | strong (default: light)")
    a.add_argument("--flip", choices=("on", "off"), help="override the preset's horizontal flip")
    for op, text in (("rotation", "fraction of a full turn"), ("zoom", "fraction"), ("shift", "width/height fraction"),
                     ("contrast", "factor"), ("brightness", "fraction of 255")):
        a.add_argument(f"--{op}", type=float, help=f"override the preset's {op} ({text}; 0 disables)")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--optimizer", default="adam", help="adam | adamw | sgd | rmsprop")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate of the head phase (default 1e-3)")
    g.add_argument("--fine-tune-lr", type=float, default=1e-4, help="learning rate once layers are unfrozen")
    g.add_argument("--schedule", default="constant", help="constant | cosine | exponential (per phase)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--epochs", type=int, default=10,
                   help="epochs of the fine-tuning phase (of the only phase with --unfreeze 0)")
    g.add_argument("--head-epochs", type=int, default=3,
                   help="epochs training the head on a frozen backbone before unfreezing")
    g.add_argument("--patience", type=int, default=5, help="early stopping on val_accuracy (best weights restored)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run directory")
    g.add_argument("--artifacts", default="artifacts", help="artifacts root (runs go to <artifacts>/runs/<name>)")
    g.add_argument("--name", help="run name (default: derived from the config, so re-running resumes)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    g.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="tf.distribute strategy: auto | one-device | mirrored | multi-worker (TF_CONFIG)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="transfer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"transfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("finetune", help="fine-tune a pretrained backbone with a custom head")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="mobilenetv2", help="registry name (see `transfer backbones`) or hub:HANDLE")
    m.add_argument("--weights", default="imagenet", help="imagenet | none | PATH to a backbone weights file")
    m.add_argument("--image-size", type=int, help="size the backbone sees; images are resized inside the model")
    m.add_argument("--head", default="default",
                   help="pooling then layers, e.g. gap,dropout0.2 or flatten,dense256-bn; "
                   "presets: default, seeds, linear, mlp")
    m.add_argument("--unfreeze", default="0",
                   help="0 (head only) | N (top N backbone layers) | blocks:N (top N blocks, layers above) | all")
    add_data_args(p)
    add_train_args(p)
    add_run_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="re-evaluate a complete run on its test (or validation) split")
    p.add_argument("run_dir")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("backbones", help="list the backbone registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backbones)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    for command in sub.choices.values():
        if not any(action.dest == "config" for action in command._actions):  # compare/pipeline have their own
            command.add_argument("--config", dest=CONFIG_DEST, metavar="FILE",
                                 help="TOML file of option values (flags given here override it)")
    parser.commands = sub.choices
    return parser


def shared_configs(args):
    """Data, augmentation, training and run configs from the flags every training command shares."""
    from transfer.config import TrainConfig
    from transfer.data import AugmentConfig, DataConfig

    data = DataConfig(
        dataset=args.dataset, data_dir=args.data_dir, val_split=args.val_split, test_split=args.test_split,
        seed=args.seed, folder_image_size=args.folder_image_size, synthetic_train=args.synthetic_train,
        synthetic_test=args.synthetic_test, limit_train=args.limit_train,
    )
    augment = AugmentConfig(
        preset=args.augment, flip=None if args.flip is None else args.flip == "on", rotation=args.rotation,
        zoom=args.zoom, shift=args.shift, contrast=args.contrast, brightness=args.brightness,
    )
    augment.resolved()  # validate before any work
    train = TrainConfig(
        optimizer=args.optimizer, lr=args.lr, fine_tune_lr=args.fine_tune_lr, schedule=args.schedule,
        label_smoothing=args.label_smoothing, batch_size=args.batch_size, epochs=args.epochs,
        head_epochs=args.head_epochs, patience=args.patience, seed=args.seed, tensorboard=not args.no_tensorboard,
    )
    from transfer.runner import RunConfig

    options = tuple(sorted(getattr(args, "replay_options", {}).items()))
    return data, augment, train, RunConfig(artifacts=args.artifacts, name=args.name, overwrite=args.overwrite,
                                           options=options, command=getattr(args, "command", ""),
                                               strategy=args.strategy)


def cmd_finetune(args) -> int:
    from transfer.config import ModelConfig
    from transfer.recipes import finetune_recipe
    from transfer.runner import execute

    data, augment, train, run = shared_configs(args)
    model = ModelConfig(backbone=args.backbone, weights=args.weights, image_size=args.image_size,
                        head=args.head, unfreeze=args.unfreeze)
    recipe = finetune_recipe(model, data.dataset, train.seed)
    execute(recipe, data, augment, train, run)
    return 0


def cmd_evaluate(args) -> int:
    from transfer.runner import reevaluate

    evaluation = reevaluate(Path(args.run_dir), split=args.split)
    top5 = evaluation.get("top5_accuracy")
    print(f"{args.split} accuracy {evaluation['accuracy']:.4f}" + (f", top-5 {top5:.4f}" if top5 is not None else "")
          + f" on {evaluation['samples']} images")
    return 0


def print_rows(rows: list[dict], columns: list[tuple[str, str, str]], *, as_json: bool = False,
               json_keys: list[str] | None = None) -> None:
    """Print ``rows`` as JSON or as a fixed-width table; ``columns`` = (key, header, format spec)."""
    import json

    if as_json:
        print(json.dumps([{k: r[k] for k in (json_keys or r)} for r in rows], indent=2))
        return
    header = "  ".join(f"{title:{spec.rstrip(',')}}" for _, title, spec in columns)
    print(header)
    print("-" * len(header))
    for r in rows:
        print("  ".join(f"{r[key] if r[key] is not None else 'n/a':{spec}}" for key, _, spec in columns))


def cmd_backbones(args) -> int:
    from transfer.backbones import BACKBONES, weights_cached
    from transfer.layers import PREPROCESSING

    rows = [
        {"name": b.name, "family": b.family, "params": b.params, "default_size": b.default_size,
         "min_size": b.min_size, "preprocessing": b.preprocessing,
         "preprocessing_detail": PREPROCESSING[b.preprocessing][3], "imagenet_cached": weights_cached(b)}
        for b in BACKBONES.values()
    ]
    for r in rows:
        r["imagenet"] = "cached" if r["imagenet_cached"] else "download"
        r["preprocessing_text"] = f"{r['preprocessing']} ({r['preprocessing_detail']})"
    print_rows(rows, [("name", "name", "<18"), ("family", "family", "<14"), ("params", "params", ">12,"),
                      ("default_size", "size", ">4"), ("min_size", "min", ">4"),
                      ("preprocessing_text", "preprocessing", "<44"), ("imagenet", "imagenet", "")],
               as_json=args.json, json_keys=[k for k in rows[0] if k not in ("imagenet", "preprocessing_text")])
    if args.json:
        return 0
    print("hub:<url | Kaggle handle | SavedModel dir>  TF Hub image feature-vector model "
          "(inputs scaled to [0, 1]; --unfreeze 0 or all)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``transfer`` console script; returns the process exit code."""
    _quiet_tensorflow()  # before build_parser: command modules may import TensorFlow
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        command = parser.commands[args.command]
        if getattr(args, CONFIG_DEST, None):
            command.set_defaults(**load_options(getattr(args, CONFIG_DEST), command))
            args = parser.parse_args(argv)
        args.replay_options = replay_options(args, command)
        return args.func(args)
    except UserError as exc:
        print(f"transfer {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"transfer {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
