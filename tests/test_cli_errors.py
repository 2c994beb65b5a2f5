"""Every user mistake on the CLI, across all commands: exit 2, one line naming the bad value, no traceback, nothing
half-written. One table; each row is a distinct bad invocation and the text its one line must contain."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import pytest

from transfer.cli import main

# Commands that write under --artifacts get a fresh, empty one per case (it must stay empty).
WRITERS = {"finetune", "baseline", "compare"}
TINY = ["--dataset", "synthetic", "--synthetic-train", "40", "--synthetic-test", "20", "--epochs", "1"]

CASES = [
    # finetune: model
    (["finetune", "--backbone", "mobilenet2"], "did you mean 'mobilenetv2'"),
    (["finetune", "--backbone", "hub:"], "empty hub handle"),
    (["finetune", "--backbone", "keras_hub:"], "empty keras-hub preset"),
    (["finetune", "--backbone", "keras_hub:/no/such/preset"], "preset directory '/no/such/preset' does not exist"),
    (["finetune", "--backbone", "keras_hub:{empty_dir}"], "'{empty_dir}' is not a keras-hub preset directory"),
    (["finetune", "--backbone", "keras_hub:no_such_preset"], "keras-hub preset 'no_such_preset' cannot be fetched"),
    (["finetune", "--weights", "/no/such/weights.h5"], "/no/such/weights.h5"),
    (["finetune", "--backbone", "resnet50", "--weights", "hed"], "--weights hed are packaged weights of vgg16"),
    (["finetune", "--backbone", "efficientnet_lite0", "--weights", "{truncated_pth}"], "truncated file"),
    (["finetune", "--backbone", "efficientnet_lite0", "--weights", "{evil_pth}"], "posix.system"),
    (["finetune", "--backbone", "efficientnet_lite0", "--weights", "{wrong_pth}"], "layer stem_conv needs shapes"),
    (["finetune", "--image-size", "0"], "--image-size 0"),
    (["finetune", "--image-size", "100000"], "--image-size 100000"),
    (["finetune", "--image-size", "big"], "'big'"),
    (["finetune", "--image-size", "16", "--backbone", "vgg16"], "--image-size 16"),
    (["finetune", "--head", "gap,dense"], "dense"),
    (["finetune", "--head", "pool,dropout0.2"], "pool"),
    (["finetune", "--unfreeze", "some"], "--unfreeze 'some'"),
    (["finetune", "--unfreeze", "blocks:0"], "blocks:0"),
    (["finetune", "--unfreeze", "-3"], "-3"),
    (["finetune", "--layer-decay", "-0.5"], "--layer-decay -0.5"),
    (["finetune", "--layer-decay", "1.5"], "--layer-decay 1.5"),
    (["finetune", "--unfreeze-schedule", "blocks:3@4,blocks:5@2"], "'blocks:5@2': epochs must be strictly increasing"),
    (["finetune", "--unfreeze-schedule", "blocks:1@2,some@4"], "'some@4': 'some' is not"),
    (["finetune", "--unfreeze", "blocks:2", "--unfreeze-schedule", "blocks:1@2"], "blocks:1 does not unfreeze more"),
    # finetune: data
    (["finetune", "--dataset", "cifar11"], "did you mean 'cifar10'"),
    (["finetune", "--dataset", "folder:/no/such/folder"], "/no/such/folder"),
    (["finetune", "--dataset", "mnist", "--data-dir", "/no/such/dir"], "/no/such/dir"),
    (["finetune", "--val-split", "0.95"], "0.95"),
    (["finetune", "--val-split", "0.5", "--test-split", "0.5"], "leaves no training data"),
    (["finetune", "--test-split", "-0.1"], "-0.1"),
    (["finetune", "--synthetic-train", "0"], "--synthetic-train 0"),
    (["finetune", "--synthetic-test", "2000000"], "--synthetic-test 2000000"),
    (["finetune", "--limit-train", "0"], "--limit-train 0"),
    (["finetune", "--folder-image-size", "-1"], "--folder-image-size -1"),
    (["finetune", "--val-split", "a-tenth"], "'a-tenth'"),
    (["finetune", "--dataset", "folder:{empty_dir}"], "{empty_dir}"),
    (["finetune", "--dataset", "folder:{corrupt_dir}"], "{corrupt_dir}"),
    (["finetune", "--dataset", "folder:{one_class_dir}"], "{one_class_dir}"),
    (["finetune", "--dataset", "folder:{img}"], "{img}"),
    (["finetune", "--dataset", "folder:{two_class_dir}", "--cache", "{txt}/sub"], "--cache"),
    (["finetune", "--dataset", "folder:{two_class_dir}", "--cache", ""], "--cache"),
    # finetune: augmentation
    (["finetune", "--augment", "medium"], "'medium'"),
    (["finetune", "--flip", "maybe"], "'maybe'"),
    (["finetune", "--rotation", "0.7"], "0.7"),
    (["finetune", "--zoom", "-1"], "-1"),
    (["finetune", "--brightness", "2"], "2"),
    # finetune: training
    (["finetune", "--optimizer", "adagrad"], "'adagrad'"),
    (["finetune", "--schedule", "linear"], "'linear'"),
    (["finetune", "--lr", "0"], "--lr 0"),
    (["finetune", "--lr", "nan"], "--lr nan"),
    (["finetune", "--fine-tune-lr", "-1e-4"], "--fine-tune-lr -0.0001"),
    (["finetune", "--label-smoothing", "1.0"], "--label-smoothing 1.0"),
    (["finetune", "--batch-size", "0"], "--batch-size 0"),
    (["finetune", "--epochs", "-1"], "--epochs -1"),
    (["finetune", "--epochs", "99999999999999999999"], "--epochs 99999999999999999999"),
    (["finetune", "--epochs", "1.5"], "'1.5'"),
    (["finetune", "--head-epochs", "-2"], "--head-epochs -2"),
    (["finetune", "--patience", "0"], "--patience 0"),
    (["finetune", "--seed", "-1"], "--seed -1"),
    (["finetune", "--strategy", "gpu"], "'gpu'"),
    (["finetune", "--strategy", "multi-worker"], "TF_CONFIG"),
    (["finetune", "--class-weight", "balance"], "did you mean 'balanced'"),
    (["finetune", "--class-weight", "{root}/weights_unknown.toml"], "valid classes: circle, square"),
    (["finetune", "--class-weight", "{root}/weights_negative.json"], "weight of class 'circle' is -2.0"),
    (["baseline", "--model", "vgg1", "--class-weight", "{root}/weights_nan.toml"], "weight of class 'circle' is nan"),
    (["finetune", "--class-weight", "{root}/weights_twice.json"], "names class 'circle' twice"),
    (["finetune", "--unfreeze", "blocks:1", "--unfreeze-schedule", "all@5", "--epochs", "2"],
     "'all@5' never applies: fine-tuning lasts --epochs 2"),
    (["finetune", "--layer-decay", "0.5", "--unfreeze", "0"], "--layer-decay 0.5 does nothing with --unfreeze 0"),
    (["finetune", "--unfreeze", "0", "--epochs", "0"], "--epochs 0 trains nothing"),
    (["baseline", "--model", "vgg1", "--epochs", "0"], "--epochs 0 trains nothing"),
    (["finetune", "--cache", "memory"], "--cache memory applies to folder datasets only"),
    (["finetune", "--config", "/no/such/config.toml"], "/no/such/config.toml"),
    (["finetune", "--config", "{bad_toml}"], "epochz"),
    (["finetune", "--config", "{float_toml}"], "epochs = 1.5"),
    # evaluate
    (["evaluate", "/no/such/run"], "/no/such/run"),
    (["evaluate", "{empty_dir}"], "incomplete"),
    (["evaluate", "{run}", "--split", "train"], "'train'"),
    # baseline(s)
    (["baseline"], "needs --model"),
    (["baseline", "--model", "vgg3-dropot"], "did you mean 'vgg3-dropout'"),
    (["baseline", "--model", "vgg1", "--protocol", "fast"], "'fast'"),
    (["baseline", "--model", "vgg1", "--epochs", "-5"], "--epochs -5"),
    # --precision: a value that is none, and float16 training on a machine without a GPU (CPU-only test machines)
    (["baseline", "--model", "vgg1", "--precision", "mixed_float16"], "mixed_float16 needs a GPU (compute capability"),
    (["finetune", "--precision", "fp16"], "invalid choice: 'fp16'"),
    (["baselines", "--verbose"], "--verbose"),
    (["backbones", "--all"], "--all"),
    # export / verify / bench
    (["export", "/no/such/run"], "/no/such/run"),
    (["export", "{run}", "--formats", "onnx,pdf"], "'pdf'"),
    (["export", "{run}", "--quantize", "int4"], "'int4'"),
    (["export", "{run}", "--formats", "savedmodel", "--quantize", "int8"], "--quantize int8"),
    (["export", "{run}", "--opset", "3"], "--opset 3"),
    (["export", "{run}", "--quantize", "int8", "--calibration-samples", "0"], "--calibration-samples 0"),
    (["export", "{run}", "--formats", "onnx", "--int8-io"], "--int8-io"),
    (["export", "{run}", "--out", "/proc/x/y"], "--out"),
    (["verify", "/no/such/export"], "/no/such/export"),
    (["verify", "{run}"], "not an export directory"),
    (["bench", "/no/such/export"], "/no/such/export"),
    (["bench", "{export}", "--iterations", "-1"], "--iterations -1"),
    (["bench", "{export}", "--threads", "0"], "--threads 0"),
    (["bench", "{export}", "--warmup", "-1"], "--warmup -1"),
    # predict
    (["predict", "{export}", "/no/such/image.png"], "/no/such/image.png"),
    (["predict", "{export}", "{txt}"], "notes.txt"),
    (["predict", "{export}", "{img}", "--format", "pdf"], "'pdf'"),
    (["predict", "{export}", "{img}", "--top-k", "0"], "--top-k"),
    (["predict", "/no/such/export", "{img}"], "/no/such/export"),
    (["predict", "{export}"], "IMAGE"),
    # explain
    (["explain", "{run}"], "IMAGE"),
    (["explain", "/no/such/run", "{img}"], "/no/such/run"),
    (["explain", "{run}", "/no/such/image.png"], "/no/such/image.png"),
    (["explain", "{run}", "{txt}"], "notes.txt"),
    (["explain", "{run}", "{img}", "--class", "zebra"], "unknown --class 'zebra'"),
    (["explain", "{run}", "{img}", "--out", "/proc/x/y"], "--out"),
    (["explain", "{hub_run}", "{img}"], "Hub module is one opaque layer"),
    # serve
    (["serve"], "nothing to serve"),
    (["serve", "--model-repo", "/no/such/repo"], "/no/such/repo"),
    (["serve", "{export}", "--port", "70000"], "70000"),
    (["serve", "{export}", "--max-batch", "0"], "max-batch=0"),
    (["serve", "{export}", "--workers", "0"], "workers=0"),
    (["serve", "{export}", "--api-key", " "], "--api-key is empty"),
    (["serve", "{run}"], "not an export directory"),
    (["serve", "{export}", "--precision", "int8"], "`transfer export RUN_DIR --formats onnx_int8`"),
    (["serve", "{export}", "--precision", "fp16"], "'fp16'"),
    # compare / pipeline
    (["compare"], "has no cells"),
    (["compare", "--baselines", "vgg1", "--seeds", "0"], "--seeds 0"),
    (["compare", "--backbones", "mobilenet2"], "did you mean 'mobilenetv2'"),
    (["compare", "--backbones", "vgg16", "--image-sizes", "32,big"], "'big'"),
    (["compare", "--baselines", "vgg1", "--latency-runs", "0"], "--latency-runs 0"),
    (["compare", "--baselines", "vgg1", "--rank-by", "f1"], "'f1'"),
    (["compare", "--baselines", "vgg1", "--class-weight", "{root}/weights_nan.toml"], "weight of class 'circle'"),
    (["compare", "--config", "/no/such/compare.toml"], "/no/such/compare.toml"),
    (["compare", "--config", "{bad_compare}"], "image_sizes = ['big']"),
    (["pipeline", "/no/such/pipeline.toml"], "/no/such/pipeline.toml"),
    (["pipeline", "{bad_compare}"], "image_sizes = ['big']"),
    (["pipeline", "{bench_toml}"], "--iterations -1"),
    # the command itself
    (["fintune"], "'fintune'"),
    (["doctor", "--offline"], "--offline"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A complete run, its export, a crafted Hub run, an image, a text file and bad config files, made once."""
    root = tmp_path_factory.mktemp("world")
    art = root / "artifacts"
    assert main(["baseline", "--model", "lenet5", *TINY, "--no-tensorboard", "--artifacts", str(art),
                 "--name", "run"]) == 0
    run = art / "runs" / "run"
    assert main(["export", str(run), "--formats", "onnx", "--out", str(art / "exports" / "run")]) == 0
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 10, 10)).save(root / "red.png")
    (root / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    for cls in ("cat", "dog"):  # a folder whose every file is corrupt, and a good one
        (root / "corrupt" / cls).mkdir(parents=True)
        (root / "two" / cls).mkdir(parents=True)
        for i in range(4):
            (root / "corrupt" / cls / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
            Image.new("RGB", (12, 12), (40 * i, 200 if cls == "cat" else 10, 10)).save(root / "two" / cls / f"{i}.png")
    (root / "one" / "cat").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (12, 12), (40 * i, 10, 10)).save(root / "one" / "cat" / f"{i}.png")
    from hub_fixtures import craft_hub_run, save_hub_module

    hub_run = craft_hub_run(art / "runs" / "hub", save_hub_module(root / "hub_module", True), embed=True)
    from torch_fixtures import write_evil, write_legacy

    from transfer import torchfile
    from transfer.pretrained import packaged

    state = torchfile.load(packaged("efficientnet_lite0", "imagenet").path())
    state["_conv_stem.weight"] = state["_conv_stem.weight"][:16]  # a stem of 16 filters, not Lite0's 32
    write_legacy(root / "wrong.pth", state)
    (root / "truncated.pth").write_bytes((root / "wrong.pth").read_bytes()[:-1000])
    write_evil(root / "evil.pth", root / "pwned")
    (root / "bad.toml").write_text("epochz = 3\n")
    (root / "weights_unknown.toml").write_text("circle = 2.0\nsquar = 3.0\n")  # synthetic's: circle, square, ...
    (root / "weights_negative.json").write_text('{"circle": -2.0}')
    (root / "weights_nan.toml").write_text("circle = nan\n")
    (root / "weights_twice.json").write_text('{"circle": 2.0, "circle": 3.0}')
    (root / "float.toml").write_text("epochs = 1.5\n")
    (root / "compare.toml").write_text("[[matrix]]\nbackbones = ['vgg16']\nimage_sizes = ['big']\n")
    (root / "bench.toml").write_text("[[matrix]]\nbaselines = ['vgg1']\n[bench]\niterations = -1\n")
    return {"root": root, "run": run, "export": art / "exports" / "run", "img": root / "red.png",
            "txt": root / "notes.txt", "empty_dir": root / "empty", "bad_toml": root / "bad.toml",
            "float_toml": root / "float.toml", "bad_compare": root / "compare.toml", "bench_toml": root / "bench.toml",
            "corrupt_dir": root / "corrupt", "one_class_dir": root / "one", "two_class_dir": root / "two",
            "hub_run": hub_run, "wrong_pth": root / "wrong.pth", "truncated_pth": root / "truncated.pth",
            "evil_pth": root / "evil.pth"}


def _snapshot(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def test_the_table_is_big_and_distinct():
    assert len(CASES) >= 60
    assert len({tuple(argv) for argv, _ in CASES}) == len(CASES)
    assert {argv[0] for argv, _ in CASES} >= {"finetune", "evaluate", "baseline", "baselines", "backbones", "export",
                                             "verify", "bench", "predict", "serve", "compare", "pipeline", "doctor"}


@pytest.mark.parametrize("argv, needle", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_invocation_is_one_line_exit_2_and_writes_nothing(world, tmp_path, capsys, argv, needle):
    names = {k: str(v) for k, v in world.items()}
    argv, needle = [a.format(**names) for a in argv], needle.format(**names)
    art = tmp_path / "art"
    if argv[0] in WRITERS:
        argv = [*argv, "--artifacts", str(art)]
        if argv[0] != "compare" and "--dataset" not in argv:
            argv += ["--dataset", "synthetic"]
        for flag, value in (("--synthetic-train", "40"), ("--synthetic-test", "20")):
            if argv[0] != "compare" and flag not in argv:
                argv += [flag, value]
    before = _snapshot(world["root"])
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors exit from inside parse_args
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert not art.exists() or not any(art.iterdir()), sorted(art.rglob("*"))
    assert _snapshot(world["root"]) == before
    assert not (world["root"] / "pwned").exists()  # the crafted .pth ran nothing
