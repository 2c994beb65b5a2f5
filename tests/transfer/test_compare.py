"""``transfer compare``: matrix parsing, ranking and Pareto fronts, the report, resume, seeds, bad input."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import csv
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from transfer.cli import main
from transfer.compare import (
    PLOTS,
    REPORT_FILES,
    annotate,
    competition_rank,
    expand_matrix,
    load_config,
    pareto_front,
    pick_winners,
    resolve_settings,
)
from transfer.errors import UserError

DATA = ["--synthetic-train", "200", "--synthetic-test", "60", "--epochs", "1", "--batch-size", "32",
        "--no-tensorboard", "--latency-runs", "5"]
TWO_CELLS = ["--baselines", "vgg1", "--backbones", "mobilenetv2", "--weights", "none", "--image-sizes", "32"]


def _compare(artifacts: Path, *argv: str) -> int:
    return main(["compare", *argv, *DATA, "--artifacts", str(artifacts)])


@pytest.fixture(scope="module")
def two_cell_report(tmp_path_factory):
    """One real comparison (a baseline and a backbone), run once for the module; returns (artifacts, stdout)."""
    artifacts = tmp_path_factory.mktemp("compare")
    capture = _Capture()
    with capture:
        assert _compare(artifacts, *TWO_CELLS, "--name", "two") == 0
    return artifacts, capture.text


class _Capture:
    """stdout capture usable from a module-scoped fixture (capsys is function-scoped)."""

    def __enter__(self):
        import io

        self._old, self._buffer = sys.stdout, io.StringIO()
        sys.stdout = self._buffer
        return self

    def __exit__(self, *exc):
        sys.stdout = self._old
        self.text = self._buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Pure functions, hand-made numbers
# ----------------------------------------------------------------------------------------------


def test_competition_rank_shares_ties():
    assert competition_rank([0.7, 0.9, 0.8, 0.9]) == [4, 1, 3, 1]
    assert competition_rank([0.5]) == [1]


def test_pareto_front_on_hand_made_points():
    accuracy = [0.90, 0.85, 0.80, 0.95, 0.70, 0.85]
    latency = [10.0, 5.0, 6.0, 40.0, 1.0, 5.0]
    # 2 is dominated by 1 (better and faster); 1 and 5 are identical, so neither dominates the other.
    assert pareto_front(accuracy, latency) == [0, 1, 3, 4, 5]
    assert pareto_front([0.5, 0.6], [2.0, 1.0]) == [1]
    assert pareto_front([], []) == []


def _row(cell, acc, lat, size, n=1000, chance=0.1):
    return {"cell": cell, "test_accuracy": acc, "latency_ms": lat, "size_bytes": size, "test_samples": n,
            "chance_accuracy": chance, "best_run": f"runs/{cell}", "run_dirs": [f"runs/{cell}"]}


def _ranked(rows):
    for row, rank in zip(rows, competition_rank([r["test_accuracy"] for r in rows]), strict=True):
        row["rank"] = rank
    annotate(rows)
    return {w["cell"]: w["why"] for w in pick_winners(rows)}


def test_winners_name_the_reasons():
    # 1,000 test images: 5 points apart is far beyond noise, so the plain fronts hold.
    rows = [_row("big", 0.95, 50.0, 100), _row("small", 0.90, 5.0, 10), _row("bad", 0.80, 60.0, 200),
            _row("tiny-slow", 0.85, 70.0, 5)]
    assert _ranked(rows) == {
        "big": ["most accurate", "pareto: accuracy vs latency", "pareto: accuracy vs size"],
        "small": ["pareto: accuracy vs latency", "pareto: accuracy vs size"],
        "tiny-slow": ["pareto: accuracy vs size"],
    }


def test_ties_within_noise_go_to_the_smallest_model_and_chance_never_wins():
    # The quickstart's real leaderboard: 180 test images, so 179, 179 and 176 correct are one result.
    rows = [_row("vgg1", 179 / 180, 0.50, 308_392, 180), _row("vgg3-dropout-bn", 179 / 180, 0.86, 1_228_456, 180),
            _row("fashion-mnist-cnn", 176 / 180, 0.51, 113_576, 180),
            _row("resnet50v2", 172 / 180, 9.10, 94_341_160, 180),
            _row("at-chance", 22 / 180, 0.01, 100, 180)]  # tiny and fast, but 12 % on ten classes
    winners = _ranked(rows)
    assert winners == {
        "fashion-mnist-cnn": ["most accurate (tied within noise with vgg1, vgg3-dropout-bn; the smallest deployable "
                              "model)", "pareto: accuracy vs size"],
        "vgg1": ["pareto: accuracy vs latency"],
    }
    by_cell = {r["cell"]: r for r in rows}
    assert by_cell["vgg1"]["tied_with_best"] and by_cell["fashion-mnist-cnn"]["tied_with_best"]
    assert not by_cell["resnet50v2"]["tied_with_best"]  # 7 images behind: beyond noise
    assert not by_cell["at-chance"]["above_chance"] and not by_cell["at-chance"]["tied_with_best"]
    low, high = by_cell["vgg1"]["accuracy_ci95"]
    assert 0.96 < low < 0.975 and high > 0.998


def test_statistics_on_hand_computed_values():
    from transfer.compare.stats import binomial_sf, p_better, wilson_interval

    assert binomial_sf(3, 10, 0.5) == pytest.approx(1 - 56 / 1024)
    assert binomial_sf(0, 10, 0.3) == 1.0 and binomial_sf(11, 10, 0.3) == 0.0
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert p_better(179, 180, 178, 180) > 0.3  # one image is never a difference
    assert p_better(600, 1000, 500, 1000) < 1e-4
    assert p_better(500, 1000, 600, 1000) > 0.99


def test_no_cell_above_chance_means_no_winner():
    rows = [_row("a", 0.11, 1.0, 10, 180), _row("b", 0.10, 2.0, 20, 180)]
    assert _ranked(rows) == {}


def test_matrix_expands_and_names_cells():
    cells = expand_matrix([{"baselines": ["vgg1"], "backbones": ["mobilenetv2"], "unfreeze": ["0", "all"],
                            "image_sizes": [32, 64]}], [], weights="imagenet", head="default")
    assert [c.name for c in cells] == ["vgg1", "mobilenetv2-32px-u0", "mobilenetv2-32px-uall",
                                       "mobilenetv2-64px-u0", "mobilenetv2-64px-uall"]


@pytest.mark.parametrize("matrix, cells, needle", [
    ([{"baselines": ["vgg3-dropot"]}], [], "did you mean 'vgg3-dropout'"),
    ([{"backbones": ["mobilenet2"]}], [], "did you mean 'mobilenetv2'"),
    ([{"baselines": ["vgg1", "vgg1"]}], [], "duplicate cell name 'vgg1'"),
    ([], [{"name": "a", "baseline": "vgg1"}, {"name": "a", "backbone": "mobilenetv2"}], "duplicate cell name 'a'"),
    ([], [], "has no cells"),
])
def test_bad_matrices(matrix, cells, needle):
    with pytest.raises(UserError, match=needle):
        expand_matrix(matrix, cells, weights="imagenet", head="default")


def test_config_keys_are_checked(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nepoch = 3\n')
    typo = r"unknown config key 'train\.epoch' in .*c\.toml; did you mean 'train\.epochs'\?"
    with pytest.raises(UserError, match=typo):
        load_config(path)
    path.write_text('[[cells]]\nbaseline = "vgg1"\nimage_siz = 3\n')
    with pytest.raises(UserError, match=re.escape("cells[0].image_siz")):
        load_config(path)
    path.write_text('[train]\nepochs = "ten"\n')
    with pytest.raises(UserError, match=r"train.epochs = 'ten' .* must be an integer"):
        load_config(path)
    for text, needle in (("[train]\nepochs = 1.9\n", "train.epochs = 1.9"),
                         ("[train]\nepochs = true\n", "epochs = True"),
                         ("[[matrix]]\nbackbones = ['vgg16']\nimage_sizes = ['big']\n", "image_sizes = ['big']"),
                         ("seeds = 2.0\n", "seeds = 2.0"), ("[matrix]\nbaselines = 'vgg1'\n", "a list of strings")):
        path.write_text(text)
        with pytest.raises(UserError, match=re.escape(needle)):
            load_config(path)


def test_shipped_configs_parse():
    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("cifar10.toml", "smoke.toml"):
        assert resolve_settings(load_config(root / name)).cells
    names = {c.model for c in resolve_settings(load_config(root / "cifar10.toml")).cells}
    assert {"cifar-aug-87", "vgg3-dropout-l2-bn", "vgg16", "resnet50", "mobilenetv2", "efficientnetb0"} <= names


# ----------------------------------------------------------------------------------------------
# Real comparisons on synthetic data
# ----------------------------------------------------------------------------------------------


def test_report_files_and_numbers_come_from_the_runs(two_cell_report):
    artifacts, out = two_cell_report
    report = artifacts / "reports" / "two"
    for name in REPORT_FILES:
        assert (report / name).is_file(), name
    for name in PLOTS:
        assert (report / "plots" / name).stat().st_size > 1000, name
    assert "cell 1/2 vgg1" in out and "cell 2/2 mobilenetv2-32px-u0-none" in out and "estimated remaining" in out
    board = json.loads((report / "leaderboard.json").read_text())
    assert [r["rank"] for r in board["rows"]] == sorted(r["rank"] for r in board["rows"])
    assert {r["cell"] for r in board["rows"]} == {"vgg1", "mobilenetv2-32px-u0-none"}
    with open(report / "leaderboard.csv", newline="") as handle:
        csv_rows = {r["cell"]: r for r in csv.DictReader(handle)}
    for row in board["rows"]:
        (run,) = [Path(p) for p in row["run_dirs"]]
        evaluation = json.loads((run / "evaluation.json").read_text())
        manifest = json.loads((run / "manifest.json").read_text())
        assert row["test_accuracy"] == evaluation["accuracy"]
        assert row["top5_accuracy"] == evaluation["top5_accuracy"]
        assert row["params"] == manifest["model"]["params"]
        assert row["trainable_params"] == manifest["model"]["trainable_params"]
        assert row["size_bytes"] == 4 * manifest["model"]["params"]  # deployable float32 weights
        assert row["model_file_bytes"] == manifest["model"]["size_bytes"] == (run / "model.keras").stat().st_size
        assert row["test_samples"] == evaluation["samples"] == 60 and row["chance_accuracy"] >= 0.1
        low, high = row["accuracy_ci95"]
        assert low <= row["test_accuracy"] <= high
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["state.json"]  # weights: not kept
        assert row["train_seconds"] == manifest["timings"]["train_seconds"]
        assert row["latency_ms"] > 0
        assert float(csv_rows[row["cell"]]["test_accuracy"]) == evaluation["accuracy"]
        assert f"{evaluation['accuracy'] * 100:.2f}%" in (report / "leaderboard.md").read_text()
    winners = json.loads((report / "winners.json").read_text())["winners"]
    assert winners and all(Path(w["best_run"]).is_dir() and w["why"] for w in winners)
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(PLOTS) and "<table>" in html


def test_running_again_trains_nothing_and_keeps_other_files(two_cell_report, capsys):
    artifacts, _ = two_cell_report
    models = sorted((artifacts / "runs").glob("*/model.keras"))
    before = {p: p.stat().st_mtime_ns for p in models}
    report = artifacts / "reports" / "two"
    (report / "pipeline.html").write_text("<p>a pipeline's page</p>")  # not the compare report's to delete
    (report / "plots" / "stale.png").write_bytes(b"old plot")
    leaderboard = report / "leaderboard.json"
    os.utime(leaderboard, ns=(0, 0))
    assert _compare(artifacts, *TWO_CELLS, "--name", "two") == 0
    out = capsys.readouterr().out
    assert out.count("already complete") == 2 and "phase " not in out
    assert {p: p.stat().st_mtime_ns for p in models} == before
    assert (report / "pipeline.html").read_text() == "<p>a pipeline's page</p>"
    assert not (report / "plots" / "stale.png").exists() and list((report / "plots").glob("*.png"))
    assert leaderboard.stat().st_mtime_ns > 0  # the report itself was rewritten
    assert sorted(p.name for p in (artifacts / "reports").iterdir()) == ["two"]  # no temporary directory left


def test_every_cell_replays_alone_from_its_config_toml(two_cell_report, capsys):
    artifacts, _ = two_cell_report
    runs = sorted((artifacts / "runs").glob("two--*"))
    assert len(runs) == 2
    for run in runs:
        replay = (run / "config.toml").read_text()
        command = "baseline" if "--vgg1--" in run.name else "finetune"
        assert f"replay with: transfer {command} --config" in replay and f'name = "{run.name}"' in replay
        stamp = (run / "model.keras").stat().st_mtime_ns
        capsys.readouterr()
        assert main([command, "--config", str(run / "config.toml")]) == 0
        assert "already complete" in capsys.readouterr().out  # the same config: the very same run
        assert (run / "model.keras").stat().st_mtime_ns == stamp


def test_seeds_give_mean_and_std_of_real_runs(tmp_path, capsys):
    assert _compare(tmp_path, "--baselines", "lenet5", "--seeds", "2", "--name", "two-seeds") == 0
    board = json.loads((tmp_path / "reports" / "two-seeds" / "leaderboard.json").read_text())
    (row,) = board["rows"]
    assert row["seeds"] == [0, 1] and len(row["run_dirs"]) == 2
    accuracies = [json.loads((Path(p) / "evaluation.json").read_text())["accuracy"] for p in row["run_dirs"]]
    assert row["test_accuracies"] == accuracies
    assert row["test_accuracy"] == pytest.approx(statistics.fmean(accuracies))
    assert row["test_accuracy_std"] == pytest.approx(statistics.stdev(accuracies))
    fingerprints = {json.loads((Path(p) / "manifest.json").read_text())["dataset"]["fingerprint"]
                    for p in row["run_dirs"]}
    assert len(fingerprints) == 1  # the seeds vary training, never the split


def _one_line_exit_2(capsys, code: int, needle: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, needle", [
    (["--baselines", "vgg1,vgg3-drop"], "did you mean 'vgg3-dropout'"),
    (["--backbones", "efficientnet-b0", "--weights", "none"], "did you mean 'efficientnetb0'"),
    (["--baselines", "vgg1,vgg1"], "duplicate cell name 'vgg1'"),
    (["--backbones", "mobilenetv2", "--unfreeze", "some"], "--unfreeze 'some'"),
    (["--baselines", "vgg1", "--seeds", "0"], "--seeds 0"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    _one_line_exit_2(capsys, _compare(tmp_path, *argv), needle)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_bad_config_is_one_line_exit_2(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('name = "x"\n[matrix]\nbaselines = ["vgg1"]\nbackbone = ["vgg16"]\n')
    artifacts = tmp_path / "artifacts"
    _one_line_exit_2(capsys, _compare(artifacts, "--config", str(config)), "unknown config key 'matrix[0].backbone'")
    config.write_text('[[cells]]\nname = "a"\nbaseline = "vgg1"\n[[cells]]\nname = "a"\nbaseline = "vgg2"\n')
    _one_line_exit_2(capsys, _compare(artifacts, "--config", str(config)), "duplicate cell name 'a'")
    config.write_text('[matrix]\nbaselines = ["vgg1"]\n')
    _one_line_exit_2(capsys, _compare(artifacts, "--config", str(config), "--baselines", "vgg2"), "either in --config")
    assert not artifacts.exists()


def test_runs_from_another_split_are_refused(two_cell_report, tmp_path, capsys):
    artifacts, _ = two_cell_report
    shutil.copytree(artifacts / "runs", tmp_path / "runs")
    manifest_path = tmp_path / "runs" / "two--vgg1--s0" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["dataset"]["fingerprint"] = "0" * 64  # as if trained on other data
    manifest_path.write_text(json.dumps(manifest))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")}
    _one_line_exit_2(capsys, _compare(tmp_path, *TWO_CELLS, "--name", "two"), "different dataset or split")
    assert not (tmp_path / "reports").exists()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")} == before


def test_export_winners_without_export_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "export.exporter", None)  # as on a checkout without the export package
    _one_line_exit_2(capsys, _compare(tmp_path, "--baselines", "vgg1", "--export-winners"),
                     "export is not available yet")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
