"""Command-line interface: ``transfer <command>``. Parsing imports no TensorFlow: commands import it when they run.

Flags come from the config dataclasses (transfer.config) through transfer.options; each command module has
``register(subparsers)``, which adds parsers whose ``func(args) -> int`` does the work.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path

from transfer import __version__
from transfer.errors import UserError
from transfer.options import CONFIG_DEST, add_data_args, add_run_args, add_train_args, load_options

COMMAND_MODULES: tuple[str, ...] = (
    "transfer.doctor",
    "transfer.baselines_cli",
    "transfer.explain",
    "export.cli",
    "transfer.compare.cli",
    "serve.cli",
    "transfer.pipeline.cli",
)
# Commands that must work without TensorFlow (the serving image has none): never import it for them.
TF_FREE = frozenset({"serve", "predict", "backbones", "datasets"})


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like every other user error of the tool; negative numbers in scientific
    notation (``--lr -1e-4``) are values, not options."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


WARNINGS_LOG = "warnings.log"


def warnings_log() -> Path:
    """Where TensorFlow's and Python's warnings go instead of the console: ``$XDG_CACHE_HOME/transfer/warnings.log``
    (``~/.cache/transfer``), or ``$TRANSFER_WARNINGS_LOG``."""
    if os.environ.get("TRANSFER_WARNINGS_LOG"):
        return Path(os.environ["TRANSFER_WARNINGS_LOG"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "transfer" / WARNINGS_LOG


def _route_warnings(tf) -> None:
    """TensorFlow's Python-side warnings (retracing, deprecations) and Python warnings (FutureWarning, ...) go to
    :func:`warnings_log`, so the console shows what the toolkit says; nothing is lost."""
    import logging

    try:
        path = warnings_log()
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    except OSError:  # no writable cache: drop them rather than bury the console
        handler = logging.NullHandler()
    logging.captureWarnings(True)
    for logger in (tf.get_logger(), logging.getLogger("py.warnings")):
        logger.handlers = [handler]
        logger.propagate = False


def quiet_tensorflow() -> None:
    """Import TensorFlow with stderr muted: its C++ start-up chatter would bury one-line errors; its later warnings go
    to a log file (:func:`warnings_log`); without TensorFlow, a one-line UserError."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if sys.modules.get("tensorflow") is not None:
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
    except ImportError as exc:
        raise UserError(f"this command needs TensorFlow, which is not installed here ({exc}); "
                        'pip install -e "." (the serving image runs only serve and predict)') from exc
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    _route_warnings(tf)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"transfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from transfer.config import ModelConfig
    from transfer.options import add_config_args

    p = sub.add_parser("finetune", help="fine-tune a pretrained backbone with a custom head")
    add_config_args(p.add_argument_group("model"), ModelConfig)
    add_data_args(p)
    add_train_args(p)
    add_run_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="re-evaluate a complete run on its test (or validation) split")
    p.add_argument("run_dir")
    p.add_argument("--split", choices=("test", "val"), default="test", help="split to evaluate (default: test)")
    p.add_argument("--trust-hub-handle", dest="trust_hub", action="store_true",
                   help="let a Hub layer load its module from its recorded handle outside the run directory "
                   "(only runs you trust; docs/security.md)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("backbones", help="list the backbone registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("datasets", help="list the dataset sources --dataset can name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_datasets)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    for command in sub.choices.values():
        if not any(action.dest == "config" for action in command._actions):  # compare/pipeline have their own
            command.add_argument("--config", dest=CONFIG_DEST, metavar="FILE",
                                 help="TOML file of option values (flags given here override it)")
    parser.commands = sub.choices
    return parser


def cmd_finetune(args) -> int:
    from transfer.config import ModelConfig
    from transfer.options import build, given, replay_options, shared_configs
    from transfer.recipes import finetune_recipe
    from transfer.runner import execute

    data, augment, train, run = shared_configs(args)
    recipe = finetune_recipe(build(ModelConfig, given(args, ModelConfig), "the model options"), data.dataset,
                             train.seed)
    options = replay_options(recipe.model_config, data, augment, train, run)
    execute(recipe, data, augment, train, _with_options(run, options))
    return 0


def _with_options(run, options: dict):
    import dataclasses

    return dataclasses.replace(run, options=tuple(sorted(options.items())))


def cmd_evaluate(args) -> int:
    from transfer.runner import reevaluate

    evaluation = reevaluate(Path(args.run_dir), split=args.split, trust_hub=args.trust_hub)
    top5 = evaluation.get("top5_accuracy")
    extra = [f"{label} {evaluation[key]:.4f}" for key, label in (("balanced_accuracy", "balanced accuracy"),
                                                                  ("macro_f1", "macro-F1"))
             if evaluation.get(key) is not None]
    print(f"{args.split} accuracy {evaluation['accuracy']:.4f}" + "".join(f", {e}" for e in extra)
          + (f", top-5 {top5:.4f}" if top5 is not None else "") + f" on {evaluation['samples']} images")
    return 0


def cmd_backbones(args) -> int:
    from transfer.backbones import BACKBONES, PREPROCESSING
    from transfer.render import print_rows

    rows = [
        {"name": b.name, "family": b.family, "params": b.params, "default_size": b.default_size,
         "min_size": b.min_size, "preprocessing": b.preprocessing,
         "preprocessing_detail": PREPROCESSING[b.preprocessing][3], "imagenet_cached": b.weights_cached(),
         "weights": b.weights_here()}
        for b in BACKBONES.values()
    ]
    for r in rows:
        r["weights_text"] = "; ".join(f"{w['weights']}: {w['status']}" for w in r["weights"])
        r["preprocessing_text"] = f"{r['preprocessing']} ({r['preprocessing_detail']})"
    print_rows(rows, [("name", "name", "<18"), ("family", "family", "<14"), ("params", "params", ">12,"),
                      ("default_size", "size", ">4"), ("min_size", "min", ">4"),
                      ("preprocessing_text", "preprocessing", "<44"), ("weights_text", "weights here", "")],
               as_json=args.json, json_keys=[k for k in rows[0] if k not in ("weights_text", "preprocessing_text")])
    if args.json:
        return 0
    print("hub:<url | Kaggle handle | SavedModel dir>  TF Hub image feature-vector model "
          "(inputs scaled to [0, 1]; --unfreeze 0 or all)")
    print(keras_hub_line())
    return 0


def keras_hub_line() -> str:
    """How ``transfer backbones`` shows the keras-hub kind: the handle, whether keras-hub is installed, what applies."""
    from transfer.backbones import KERAS_HUB_BLOCKS, KERAS_HUB_HANDLE, KERAS_HUB_INSTALL, keras_hub_version

    version = keras_hub_version()
    installed = f"keras-hub {version} installed" if version else f"keras-hub not installed: {KERAS_HUB_INSTALL}"
    blocks = ", ".join(name.removesuffix("Backbone") for name in KERAS_HUB_BLOCKS)
    return (f"{KERAS_HUB_HANDLE}  keras-hub image Backbone.from_preset ({installed}; size and input scaling from the "
            f"preset's ImageConverter; --unfreeze N, all, blocks:N on {blocks}; offline: a local preset dir written "
            "by save_to_preset)")


def cmd_datasets(args) -> int:
    from transfer.data.sources import SOURCES
    from transfer.render import print_rows

    rows = [{"name": source.name, "description": source.describe()} for source in SOURCES]
    print_rows(rows, [("name", "name", "<15"), ("description", "description", "")], as_json=args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``transfer`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        command = parser.commands[args.command]
        if getattr(args, CONFIG_DEST, None):
            command.set_defaults(**load_options(getattr(args, CONFIG_DEST), command))
            args = parser.parse_args(argv)
        if args.command not in TF_FREE:
            quiet_tensorflow()
        return args.func(args)
    except UserError as exc:
        print(f"transfer {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"transfer {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
