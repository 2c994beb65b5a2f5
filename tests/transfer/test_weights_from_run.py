"""``--weights RUN_DIR``: a backbone starts from an earlier run's backbone (pretrain on one dataset, fine-tune on
another); the manifest names the source run and its data; another backbone's run is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transfer.cli import main

TINY = ["--image-size", "32", "--epochs", "1", "--head-epochs", "0", "--batch-size", "32", "--no-tensorboard"]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    art = tmp_path_factory.mktemp("art")
    assert main(["finetune", "--backbone", "mobilenetv2", "--weights", "none", "--unfreeze", "all", *TINY,
                 "--dataset", "synthetic", "--synthetic-train", "200", "--synthetic-test", "60",
                 "--artifacts", str(art), "--name", "pretrain"]) == 0
    return art, art / "runs" / "pretrain"


def _backbone_weights(run):
    from transfer.runmodel import load_run_model

    manifest = json.loads((run / "manifest.json").read_text())
    return load_run_model(run).get_layer(manifest["model"]["backbone_layer"]).get_weights()


def test_a_frozen_backbone_keeps_the_source_runs_weights_exactly(source_run):
    art, run = source_run
    # another dataset (real digits), the source run given by its model.keras: the head trains, the backbone is it
    assert main(["finetune", "--backbone", "mobilenetv2", "--weights", str(run / "model.keras"), "--unfreeze", "0",
                 *TINY, "--dataset", "digits", "--artifacts", str(art), "--name", "transfer"]) == 0
    target = art / "runs" / "transfer"
    for before, after in zip(_backbone_weights(run), _backbone_weights(target), strict=True):
        np.testing.assert_array_equal(before, after)
    manifest = json.loads((target / "manifest.json").read_text())
    source = json.loads((run / "manifest.json").read_text())
    assert manifest["model"]["weights_source"] == {
        "run": "pretrain", "path": str(run.resolve()), "dataset": "synthetic",
        "dataset_fingerprint": source["dataset"]["fingerprint"]}
    assert manifest["model"]["batchnorm"] == "frozen (inference mode)"


@pytest.mark.parametrize("argv, needle", [
    (["--backbone", "resnet50v2"], "is a run of mobilenetv2, not resnet50v2"),
    (["--backbone", "mobilenetv2", "--weights", "{art}/runs"], "is not a file"),
])
def test_weights_from_the_wrong_run_are_one_line_errors(source_run, tmp_path, capsys, argv, needle):
    art, run = source_run
    argv = [a.format(art=art) for a in argv]
    if "--weights" not in argv:
        argv += ["--weights", str(run)]
    code = main(["finetune", *argv, *TINY, "--artifacts", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "x").exists()


def test_a_baseline_run_has_no_backbone_to_start_from(tmp_path, capsys):
    assert main(["baseline", "--model", "vgg1", "--epochs", "1", "--synthetic-train", "100", "--synthetic-test", "30",
                 "--no-tensorboard", "--artifacts", str(tmp_path), "--name", "b"]) == 0
    capsys.readouterr()
    assert main(["finetune", "--weights", str(tmp_path / "runs" / "b"), *TINY, "--artifacts", str(tmp_path)]) == 2
    assert "a scratch baseline (no backbone)" in capsys.readouterr().err
