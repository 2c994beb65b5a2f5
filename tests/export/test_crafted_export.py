"""An export directory is data: a crafted one whose saved_model/ is a graph that writes a file (its sha256 rewritten
in the manifest, so the hash check passes) is refused before it is loaded by `transfer predict --format savedmodel`,
`transfer verify` and `transfer bench`: one line, exit 2, the file never written, nothing of the export rewritten."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))  # serve_fixtures: the tiny trained export

from export.contract import sha256_of
from transfer.cli import main


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """(export dir, marker, image): a real export whose saved_model/ writes ``marker`` when it runs."""
    import shutil

    import tensorflow as tf
    from hub_fixtures import WritesAFile
    from PIL import Image
    from serve_fixtures import build_export

    root = tmp_path_factory.mktemp("crafted")
    export_dir = build_export(root / "tiny", formats=("onnx", "savedmodel"))
    marker = root / "graph-ran.txt"
    shutil.rmtree(export_dir / "saved_model")
    module = WritesAFile(str(marker))
    tf.saved_model.save(module, str(export_dir / "saved_model"), signatures={"serving_default": module.__call__})
    manifest = json.loads((export_dir / "manifest.json").read_text())
    manifest["export"]["formats"]["savedmodel"]["sha256"] = sha256_of(export_dir / "saved_model")
    (export_dir / "manifest.json").write_text(json.dumps(manifest))
    image = root / "red.png"
    Image.fromarray(np.full((32, 32, 3), (220, 30, 30), np.uint8)).save(image)
    assert not marker.exists()
    return export_dir, marker, image


def _snapshot(export_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(export_dir)): p.read_bytes() for p in sorted(export_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["predict", "verify", "bench"])
def test_a_crafted_savedmodel_is_refused_unloaded(crafted, capsys, command):
    export_dir, marker, image = crafted
    argv = {"predict": ["predict", str(export_dir), str(image), "--format", "savedmodel"],
            "verify": ["verify", str(export_dir), "--verify-samples", "32"],
            "bench": ["bench", str(export_dir), "--iterations", "1", "--warmup", "0"]}[command]
    before = _snapshot(export_dir)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "reach outside the model" in err and "WriteFile" in err, err
    assert not marker.exists()
    assert _snapshot(export_dir) == before  # nothing written: no verify.json, bench.json or manifest change


def _tflite(path: Path, custom_codes: list[str]) -> Path:
    """A TFLite flatbuffer whose operator codes are ADD and ``custom_codes`` (enough for the scan; never run)."""
    flatbuffers = pytest.importorskip("flatbuffers")
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    codes = [schema.OperatorCodeT()]
    codes[0].builtinCode = schema.BuiltinOperator.ADD
    for name in custom_codes:
        codes.append(schema.OperatorCodeT())
        codes[-1].customCode = name
    model = schema.ModelT()
    model.version, model.operatorCodes = 3, codes
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


def test_a_tflite_model_with_flex_ops_that_reach_outside_is_refused_unloaded(tmp_path):
    from export.runtimes import ReachesOutside, load_tflite, tflite_outside_ops

    assert tflite_outside_ops(_tflite(tmp_path / "plain.tflite", [])) == set()
    assert tflite_outside_ops(_tflite(tmp_path / "math.tflite", ["FlexMatMul"])) == set()
    hostile = _tflite(tmp_path / "hostile.tflite", ["FlexWriteFile", "FlexPyFunc"])
    assert tflite_outside_ops(hostile) == {"WriteFile", "PyFunc"}
    with pytest.raises(ReachesOutside, match="reach outside the model"):
        load_tflite(hostile)
