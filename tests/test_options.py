"""`--config FILE` on every command: TOML under the flags, and a run's config.toml replays the run."""

from __future__ import annotations

import json

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


def test_every_command_takes_a_config_file():
    parser = build_parser()
    for name, command in parser.commands.items():
        assert any(action.dest in ("config", "config_file") for action in command._actions), name
