"""``transfer pipeline``: compare -> export -> verify -> bench -> report, resume, bad config."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
from pathlib import Path

import pytest

from transfer.cli import main
from transfer.errors import UserError

TINY = """
name = "tiny"
latency_runs = 3
[data]
dataset = "synthetic"
synthetic_train = 120
synthetic_test = 40
[augment]
preset = "none"
[train]
batch_size = 32
epochs = 3  # vgg1 on 120 shapes: 1 epoch can end at chance (no winner), 3 reach ~85 %
tensorboard = false
[[matrix]]
baselines = ["vgg1"]
[export]
formats = ["onnx", "tflite"]
[bench]
iterations = 5
warmup = 1
"""


def _mtimes(export_dir: Path, run_dir: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in (run_dir / "model.keras", export_dir / "model.onnx",
                                             export_dir / "model.tflite", export_dir / "bench.json")}


def test_pipeline_end_to_end_resume_and_failure(tmp_path, capsys, monkeypatch):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    artifacts = tmp_path / "art"
    assert main(["pipeline", str(config), "--artifacts", str(artifacts)]) == 0
    out = capsys.readouterr().out

    report = artifacts / "reports" / "tiny"
    data = json.loads((report / "pipeline.json").read_text())
    html = (report / "pipeline.html").read_text()
    assert data["status"] == "passed" and "data:image/png;base64," in html and 'href="report.html"' in html
    assert len(data["winners"]) == 1
    winner = data["winners"][0]
    run_dir, export_dir = Path(winner["best_run"]), Path(winner["export"]["dir"])
    assert export_dir == (artifacts / "exports" / run_dir.name).resolve()
    assert os.path.relpath(run_dir, report) in html and os.path.relpath(export_dir, report) in html

    # the numbers are the runs' and the exports' own files, copied, never re-typed
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert winner["evaluation"]["accuracy"] == evaluation["accuracy"] == data["leaderboard"][0]["test_accuracy"]
    verify = json.loads((export_dir / "verify.json").read_text())["formats"]
    assert set(verify) == {"onnx", "tflite"} and all(r["passed"] for r in verify.values())
    assert winner["export"]["verify"] == verify
    bench = json.loads((export_dir / "bench.json").read_text())["formats"]
    assert winner["bench"]["formats"] == bench and bench["onnx"]["batch32"]["p50_ms"] > 0
    assert f"{verify['onnx']['top1_agreement'] * 100:.2f}%" in html

    # the summary names the best export and the exact serve command
    assert data["best"]["export_dir"] == str(export_dir)
    assert data["best"]["serve_command"] == f"transfer serve {export_dir}" in out  # tmp_path is outside the cwd

    # a second run redoes nothing
    before = _mtimes(export_dir, run_dir)
    assert main(["pipeline", str(config), "--artifacts", str(artifacts)]) == 0
    assert _mtimes(export_dir, run_dir) == before
    again = json.loads((report / "pipeline.json").read_text())["winners"][0]
    assert again["export"]["skipped"] and again["bench"]["skipped"]
    assert again["export"]["verify"] == verify

    # a failing export is reported (pipeline.json, html, exit 1) instead of crashing the run
    import export.exporter

    def broken(cfg):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(export.exporter, "run_export", broken)
    capsys.readouterr()
    assert main(["pipeline", str(config), "--artifacts", str(artifacts), "--formats", "tflite",
                 "--quantize", "fp16"]) == 1
    failed = json.loads((report / "pipeline.json").read_text())
    assert failed["status"] == "failed" and failed["best"] is None
    assert "converter exploded" in failed["winners"][0]["export"]["error"]
    assert "converter exploded" in (report / "pipeline.html").read_text()
    assert "FAILED" in capsys.readouterr().out


def test_pipeline_unknown_key_is_one_line_exit_2(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(TINY.replace("[bench]\n", "[bench]\nthreadz = 2\n"))
    assert main(["pipeline", str(config), "--artifacts", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bench.threadz" in err and "bench.threads" in err
    config.write_text(TINY.replace("[train]\n", "[train]\nepochz = 2\n"))
    assert main(["pipeline", str(config), "--artifacts", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.epochz" in err
    assert not (tmp_path / "runs").exists()


def test_pipeline_settings_resolve_once_from_the_file_and_the_flags(tmp_path):
    import argparse

    from transfer.pipeline.cli import resolve

    config = tmp_path / "p.toml"
    config.write_text(TINY)
    args = argparse.Namespace(config=str(config), artifacts=str(tmp_path), name="renamed", strategy="auto",
                              formats=None, quantize=None, port=None, rank_by=None)
    settings, exporting, benching = resolve(args)
    assert settings.top.name == "renamed" and settings.top.artifacts == str(tmp_path) and settings.top.latency_runs == 3
    assert settings.train.epochs == 3 and settings.train.batch_size == 32 and settings.train.tensorboard is False
    assert settings.train.lr == 1e-3  # not in the file: TrainConfig's default
    assert settings.data.synthetic_train == 120 and settings.augment.preset == "none"
    assert [c.name for c in settings.cells] == ["vgg1"] and settings.config_file == str(config)
    assert exporting["wanted"] == ["onnx", "tflite"] and exporting["given_options"] == {}
    assert (benching.threads, benching.iterations, benching.warmup) == (1, 5, 1)
    args.formats = "onnx"
    assert resolve(args)[1]["wanted"] == ["onnx"]  # the flag wins over [export]
    config.write_text(TINY.replace("iterations = 5", "iterations = 0"))
    with pytest.raises(UserError, match="iterations"):
        resolve(args)
    config.write_text(TINY.replace("iterations = 5", "iterations = 5.0"))
    with pytest.raises(UserError, match=r"bench\.iterations = 5\.0"):
        resolve(args)
