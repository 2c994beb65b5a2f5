"""`--config FILE` on every command: TOML under the flags, and a run's config.toml replays the run."""

from __future__ import annotations

import json
import subprocess
import sys

from transfer.cli import build_parser, main


def test_config_file_with_flag_override_then_replay(tmp_path, capsys):
    config = tmp_path / "vgg.toml"
    config.write_text(f"""
artifacts = "{tmp_path}"
[model]
backbone = "vgg16"
weights = "none"
image-size = 32
unfreeze = "all"
[train]
head_epochs = 0
epochs = 3
batch-size = 32
no-tensorboard = true
[data]
synthetic-train = 120
synthetic-test = 40
""")
    assert main(["finetune", "--config", str(config), "--epochs", "1"]) == 0
    run = tmp_path / "runs" / "vgg16_synthetic_32px_uall"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["train"]["epochs"] == 1  # the flag won over the file
    assert manifest["config"]["train"]["batch_size"] == 32 and manifest["config"]["model"]["backbone"] == "vgg16"
    assert manifest["options"]["epochs"] == 1 and manifest["options"]["image_size"] == 32
    replay = (run / "config.toml").read_text()
    assert "replay with: transfer finetune --config" in replay and "epochs = 1" in replay
    stamp = (run / "model.keras").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["finetune", "--config", str(run / "config.toml")]) == 0
    assert "already complete" in capsys.readouterr().out
    assert (run / "model.keras").stat().st_mtime_ns == stamp


def test_unknown_or_mistyped_config_keys_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nbackbon = 'vgg16'\n")
    assert main(["finetune", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown option in" in err and "did you mean 'backbone'?" in err and err.count("\n") == 1
    bad.write_text("image-size = 'big'\n")
    assert main(["finetune", "--config", str(bad)]) == 2
    assert "image-size = 'big'" in capsys.readouterr().err
    assert main(["finetune", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_command_reads_its_config_file(tmp_path, capsys):
    """Not just a --config flag: every command reads the file and checks its keys (a typo is a one-line exit 2)."""
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_option = 1\n")
    positional = {"evaluate": ["RUN"], "export": ["RUN"], "verify": ["EXPORT"], "bench": ["EXPORT"],
                  "predict": ["EXPORT", "x.png"], "explain": ["RUN", "x.png"], "pipeline": [str(bad)]}
    commands = build_parser().commands
    assert {"finetune", "baseline", "compare", "pipeline", "export", "serve", "predict"} <= set(commands)
    for name in commands:
        argv = [name, *positional.get(name, [])] + ([] if name == "pipeline" else ["--config", str(bad)])
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert "no_such_option" in err and err.count("\n") == 1, (name, err)


def test_config_file_values_of_the_wrong_type_are_refused(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    for text, needle in (("epochs = 1.9\n", "epochs = 1.9"), ("epochs = true\n", "epochs = True"),
                         ("lr = 'fast'\n", "lr = 'fast'"), ("tensorboard = 1\n", "tensorboard = 1"),
                         ("optimizer = 'adagrad'\n", "choices: adam")):
        bad.write_text(text)
        assert main(["finetune", "--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_toml_writer_and_reader_round_trip(tmp_path):
    from transfer.options import dump_toml, read_toml

    data = {"name": 'a "quoted" \\ name', "seeds": 2, "lr": 1e-3, "flag": False, "sizes": [32, 64],
            "data": {"dataset": "folder:/tmp/x y", "val_split": 0.25},
            "cells": [{"name": "a", "baseline": "vgg1"}, {"name": "b", "backbone": "vgg16", "image_size": 32}]}
    path = tmp_path / "x.toml"
    path.write_text(dump_toml(data, header="two\nlines"))
    assert read_toml(path) == data
    assert path.read_text().startswith("# two\n# lines\n")


def test_help_shows_every_default_from_the_configs():
    from transfer.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
    from transfer.options import cli_fields, flag_of

    help_text = " ".join(build_parser().commands["finetune"].format_help().split())
    for cls in (ModelConfig, TrainConfig, DataConfig, AugmentConfig, RunConfig):
        for f in cli_fields(cls):
            default = f.metadata.get("default_text") or {True: "on", False: "off"}.get(f.default, str(f.default))
            assert f"{flag_of(f)}" in help_text and f"(default: {default})" in help_text, (cls.__name__, f.name)
    assert "(default: 64)" in help_text and "(default: 0.001)" in help_text


def test_baseline_replays_from_its_config_toml(tmp_path, capsys):
    argv = ["baseline", "--model", "lenet5", "--synthetic-train", "120", "--synthetic-test", "40", "--epochs", "1",
            "--no-tensorboard", "--artifacts", str(tmp_path), "--name", "le"]
    assert main(argv) == 0
    run = tmp_path / "runs" / "le"
    replay = (run / "config.toml").read_text()
    assert 'model = "lenet5"' in replay and "epochs = 1" in replay and 'protocol = "seeds"' in replay
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["train"]["batch_size"] == 64  # the protocol's, not the finetune default
    capsys.readouterr()
    assert main(["baseline", "--config", str(run / "config.toml")]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["baseline", "--epochs", "1"]) == 2
    assert "needs --model" in capsys.readouterr().err


def _python(*code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code], capture_output=True, text=True, timeout=120)


def test_the_cli_parses_without_tensorflow():
    probe = ("import sys, runpy; sys.argv = ['transfer', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('transfer', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
             "heavy = sorted(m for m in ('tensorflow', 'keras', 'tf_keras') if m in sys.modules)\n"
             "print('HEAVY', heavy, 'CODE', code)")
    for argv in (["--help"], ["finetune", "--help"], ["compare", "--help"], ["pipeline", "--help"],
                 ["serve", "--help"], ["export", "--help"], ["finetune", "--epochs", "x"], ["fintune"]):
        done = _python("-c", probe, *argv)
        assert "HEAVY [] CODE" in done.stdout, (argv, done.stdout, done.stderr[-500:])
        if argv[-1] != "--help":
            assert "CODE 2" in done.stdout and done.stderr.count("\n") == 1, done.stderr


def test_training_without_tensorflow_is_one_line_exit_2():
    code = ("import sys; sys.modules['tensorflow'] = None  # as in the serving image\n"
            "from transfer.cli import main; sys.exit(main(['finetune', '--epochs', '1']))")
    done = _python("-c", code)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "needs TensorFlow" in done.stderr and "serve and predict" in done.stderr
