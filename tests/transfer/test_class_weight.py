"""--class-weight (none | balanced | FILE), balanced accuracy and macro-F1, and ranking a comparison by them."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hashlib
import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.utils.class_weight import compute_class_weight

from transfer import class_weights
from transfer.cli import main
from transfer.compare.ranking import annotate, competition_rank, metric_key, pick_winners
from transfer.compare.stats import bootstrap
from transfer.config import CompareConfig, TrainConfig
from transfer.errors import UserError
from transfer.evaluate import balanced_accuracy, macro_f1, metrics_from_probs

CLASSES = ["cat", "dog", "owl"]
TINY = ["--dataset", "synthetic", "--synthetic-train", "200", "--synthetic-test", "50", "--epochs", "2",
        "--batch-size", "32", "--no-tensorboard"]

# ---------------------------------------------------------------------------------------------- the weights


def test_balanced_weights_match_sklearn_on_an_imbalanced_split():
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    got = class_weights.resolve("balanced", CLASSES, y)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y)
    assert got.source == "balanced" and got.vector(CLASSES) == pytest.approx(expected)
    assert got.vector(CLASSES) == pytest.approx([100 / (3 * 60), 100 / (3 * 30), 100 / (3 * 10)])
    # the weights average 1 over the training images: the loss keeps its scale
    assert np.mean(np.asarray(got.vector(CLASSES))[y]) == pytest.approx(1.0)
    assert class_weights.resolve("none", CLASSES, y).vector(CLASSES) == [1.0, 1.0, 1.0]
    assert class_weights.resolve("none", CLASSES, y).identity() is None


@pytest.mark.parametrize("name, text", [("w.toml", 'owl = 5\ncat = 0.5\n'), ("w.json", '{"owl": 5, "cat": 0.5}'),
                                        ("weights.txt", '{"owl": 5.0, "cat": 0.5}')])
def test_a_file_names_some_classes_and_the_rest_weigh_one(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    got = class_weights.resolve(str(path), CLASSES, np.array([0, 1, 2]))
    assert got.weights == {"cat": 0.5, "dog": 1.0, "owl": 5.0}
    assert got.source == "file" and got.file == str(path)
    assert got.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert got.record() == {"source": "file", "file": str(path), "sha256": got.sha256, "weights": got.weights}
    assert got.identity() == {"source": "file", "sha256": got.sha256, "weights": got.weights}  # content, not path


@pytest.mark.parametrize("text, needle", [
    ("cat = -1\n", "-1"), ("cat = 0\n", "0"), ("cat = nan\n", "nan"), ("cat = inf\n", "inf"),
    ("cat = true\n", "must be a number"), ('cat = "2"\n', "must be a number"), ("[cat]\nx = 1\n", "must be a number"),
    ("cat = = 1\n", "not valid TOML or JSON"), ("[1, 2]", "not valid TOML or JSON"),
])
def test_bad_weights_are_refused_when_the_config_is_built(tmp_path, text, needle):
    path = tmp_path / "w.toml"
    path.write_text(text)
    with pytest.raises(UserError, match="--class-weight") as err:
        TrainConfig(class_weight=str(path))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_classes_and_modes_are_one_line_errors(tmp_path):
    path = tmp_path / "w.toml"
    path.write_text("cat = 2\nowls = 3\nbird = 1\n")
    with pytest.raises(UserError) as err:
        class_weights.resolve(str(path), CLASSES, np.array([0, 1, 2]))
    message = str(err.value)
    assert "owls, bird" in message and "valid classes: cat, dog, owl" in message and "did you mean 'owl'" in message
    with pytest.raises(UserError, match=r"'balance' is not none, balanced or an existing.*did you mean 'balanced'"):
        TrainConfig(class_weight="balance")
    with pytest.raises(UserError, match="is a directory"):
        TrainConfig(class_weight=str(tmp_path))


# ---------------------------------------------------------------------------------------------- the metrics


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_and_macro_f1_match_sklearn():
    rng = np.random.default_rng(3)
    classes = [str(i) for i in range(5)]
    # class 3 has no test image but is predicted; class 4 is neither in the split nor predicted
    y = np.array([0] * 20 + [1] * 6 + [2] * 2)
    pred = y.copy()
    pred[rng.choice(len(y), 10, replace=False)] = rng.integers(0, 4, 10)
    pred[:3] = 3
    probs = np.eye(5)[pred] * 0.9 + 0.02
    out = metrics_from_probs(probs, y, classes)
    present = np.unique(y)
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert out["macro_f1"] == pytest.approx(f1_score(y, pred, labels=present, average="macro"))
    assert out["classes_in_split"] == 3
    # the same on a stack of matrices (what the bootstrap evaluates)
    stack = np.stack([out["confusion_matrix"], np.eye(5, dtype=int)])
    assert balanced_accuracy(stack).tolist() == pytest.approx([out["balanced_accuracy"], 1.0])
    assert macro_f1(stack).tolist() == pytest.approx([out["macro_f1"], 1.0])
    assert balanced_accuracy(np.zeros((3, 3))) == 0.0 and macro_f1(np.zeros((3, 3))) == 0.0


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    confusion = [[40, 5, 5], [4, 8, 0], [1, 1, 6]]
    a = bootstrap(confusion, "balanced_accuracy", 1 / 3)
    assert a == bootstrap(confusion, "balanced_accuracy", 1 / 3)  # reproducible
    low, high = a["ci95"]
    assert low < balanced_accuracy(confusion) < high and a["p_vs_chance"] < 0.01
    wide = bootstrap(confusion, "macro_f1", 1 / 3)["ci95"]
    narrow = bootstrap(np.asarray(confusion) * 10, "macro_f1", 1 / 3)["ci95"]  # ten times the images
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 2


def _row(cell, confusion, size, lat=1.0):
    confusion = np.asarray(confusion)
    n = int(confusion.sum())
    return {"cell": cell, "test_accuracy": np.trace(confusion) / n,
            "test_balanced_accuracy": balanced_accuracy(confusion), "test_macro_f1": macro_f1(confusion),
            "test_samples": n, "confusion_matrix": confusion.tolist(),
            "chance_accuracy": max(1 / len(confusion), confusion.sum(axis=1).max() / n), "latency_ms": lat,
            "size_bytes": size, "best_run": f"runs/{cell}", "run_dirs": [f"runs/{cell}"]}


def _winners(rows, rank_by):
    for row, rank in zip(rows, competition_rank([r[metric_key(rank_by)] for r in rows]), strict=True):
        row["rank"] = rank
    annotate(rows, rank_by=rank_by)
    return {w["cell"]: w["why"] for w in pick_winners(rows)}


def test_rank_by_balanced_accuracy_changes_the_winner():
    # 1,000 test images, 70 % of one class. "majority" is right on the big class and often wrong on the others;
    # "fair" loses some of the big class but finds most of the small ones. A constant guess is at chance either way.
    majority = [[695, 3, 2], [40, 105, 5], [40, 5, 105]]  # accuracy 0.905, balanced accuracy 0.80
    fair = [[560, 70, 70], [6, 140, 4], [6, 4, 140]]  # accuracy 0.84, balanced accuracy 0.89
    constant = [[700, 0, 0], [150, 0, 0], [150, 0, 0]]  # accuracy 0.7 (the majority share), balanced exactly 1/3
    rows = lambda: [_row("majority", majority, 10), _row("fair", fair, 20), _row("constant", constant, 1)]  # noqa: E731
    assert _winners(rows(), "accuracy") == {"majority": ["most accurate", "pareto: accuracy vs latency",
                                                         "pareto: accuracy vs size"]}
    by_balanced = rows()
    assert _winners(by_balanced, "balanced_accuracy") == {
        "fair": ["best balanced accuracy", "pareto: balanced accuracy vs latency", "pareto: balanced accuracy vs size"],
        "majority": ["pareto: balanced accuracy vs size"]}
    by_cell = {r["cell"]: r for r in by_balanced}
    assert not by_cell["constant"]["above_chance"] and by_cell["constant"]["rank_chance"] == pytest.approx(1 / 3)
    assert by_cell["fair"]["rank"] == 1 and by_cell["majority"]["rank"] == 2
    low, high = by_cell["fair"]["rank_ci95"]
    assert low < by_cell["fair"]["rank_value"] < high
    # macro-F1 weighs precision too: fair's 140 false alarms on each small class cost it (0.81 vs 0.85)
    assert list(_winners(rows(), "macro_f1")) == ["majority"]
    with pytest.raises(UserError, match="--rank-by 'f1'"):
        CompareConfig(rank_by="f1")


def test_report_shows_the_chosen_metric_with_its_interval():
    from transfer.compare.report import _markdown

    rows = [_row("fair", [[760, 70, 70], [8, 40, 2], [8, 2, 40]], 20), _row("x", [[900, 0, 0], [25, 25, 0],
                                                                                 [25, 0, 25]], 10)]
    for r in rows:
        r.update(test_accuracy_std=None, test_balanced_accuracy_std=None, test_macro_f1_std=None, top5_accuracy=None,
                 top5_accuracy_std=None, params=5, trainable_params=5, train_seconds=1.0)
    winners = _winners(rows, "balanced_accuracy")
    text = _markdown(rows, [{"cell": c, "why": w, "best_run": "r"} for c, w in winners.items()], "t",
                     {"dataset": "d", "fingerprint": "0" * 12, "seeds": [0], "train": {"epochs": 1, "batch_size": 8}})
    header = next(line for line in text.splitlines() if line.startswith("| rank"))
    assert header.startswith("| rank | cell | balanced acc | 95% interval |") and "test acc" in header
    assert "bootstrap interval (1000 resamples" in text


# ---------------------------------------------------------------------------------------------- real training


def _run(tmp_path, name, *extra):
    assert main(["baseline", "--model", "vgg1", *TINY, "--artifacts", str(tmp_path / "art"), "--name", name,
                 *extra]) == 0
    run = tmp_path / "art" / "runs" / name
    return run, json.loads((run / "manifest.json").read_text()), json.loads((run / "evaluation.json").read_text())


def test_weights_reach_training_and_the_manifest(tmp_path, capsys):
    weights = tmp_path / "weights.toml"
    weights.write_text("diamond = 200.0\n")
    _, plain_manifest, plain = _run(tmp_path, "plain")
    run, manifest, weighted = _run(tmp_path, "weighted", "--class-weight", str(weights))
    diamond = plain_manifest["classes"].index("diamond")
    predicted = lambda evaluation: sum(row[diamond] for row in evaluation["confusion_matrix"])  # noqa: E731
    assert predicted(weighted) >= max(3 * predicted(plain), 20), (predicted(plain), predicted(weighted))
    assert plain_manifest["class_weight"]["source"] == "none"
    assert "class_weight" not in plain_manifest["config"]["train"]  # none: the identity runs had before the option
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["class_weight"] == {"source": "file", "file": str(weights), "sha256": sha,
                                        "weights": {c: 200.0 if c == "diamond" else 1.0 for c in manifest["classes"]}}
    assert manifest["config"]["train"]["class_weight"]["sha256"] == sha
    for key in ("balanced_accuracy", "macro_f1"):
        assert manifest["metrics"][f"test_{key}"] == weighted[key]
    out = capsys.readouterr().out
    assert "class weights (file): circle 1, " in out and "diamond 200" in out
    assert "balanced accuracy" in out.split("done:")[-1] and "macro-F1" in out.split("done:")[-1]

    # the weights are part of the run's identity: other weights (or the same file changed) are refused
    capsys.readouterr()
    weights.write_text("diamond = 100.0\n")
    assert main(["baseline", "--model", "vgg1", *TINY, "--artifacts", str(tmp_path / "art"), "--name", "weighted",
                 "--class-weight", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "different config (train.class_weight.sha256" in err
    assert main(["baseline", "--model", "vgg1", *TINY, "--artifacts", str(tmp_path / "art"), "--name", "plain",
                 "--class-weight", "balanced"]) == 2
    assert "train.class_weight: None -> 'balanced'" in capsys.readouterr().err
    assert "class-weight = " in (run / "config.toml").read_text()  # the replay names the file


def test_compare_and_pipeline_take_both_options(tmp_path):
    from transfer.cli import build_parser
    from transfer.compare.matrix import load_config, resolve_settings

    config = tmp_path / "c.toml"
    config.write_text('rank_by = "macro_f1"\n[train]\nclass_weight = "balanced"\n[[matrix]]\nbaselines = ["vgg1"]\n')
    settings = resolve_settings(load_config(config))
    assert settings.top.rank_by == "macro_f1" and settings.train.class_weight == "balanced"
    args = build_parser().parse_args(["compare", "--config", str(config), "--rank-by", "balanced_accuracy"])
    assert resolve_settings(load_config(config), args).top.rank_by == "balanced_accuracy"  # the flag wins
    from transfer.pipeline.cli import resolve

    pipeline_args = build_parser().parse_args(["pipeline", str(config), "--rank-by", "accuracy"])
    assert resolve(pipeline_args)[0].top.rank_by == "accuracy"
    assert resolve(build_parser().parse_args(["pipeline", str(config)]))[0].top.rank_by == "macro_f1"
