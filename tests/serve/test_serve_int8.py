"""`transfer serve --precision int8`: each export's verified onnx_int8 artifact is served (named by the format
table), answers close to the fp32 server, and an export without one is refused in one line naming the way out."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from export.contract import ExportDir
from export.formats import FORMATS
from serve.app import create_app
from serve.model import OnnxModel, check_servable, served_format
from serve.settings import Settings
from transfer.errors import UserError

fastapi_testclient = pytest.importorskip("fastapi.testclient")
TestClient = fastapi_testclient.TestClient


@pytest.fixture(scope="module")
def int8_export(export_dir, tmp_path_factory):
    """A copy of the serve tests' export (same run, same name) with onnx_int8 added by the real exporter."""
    from export.exporter import ExportConfig, run_export

    dest = tmp_path_factory.mktemp("int8") / export_dir.name
    shutil.copytree(export_dir, dest)
    result = run_export(ExportConfig(run_dir=str(ExportDir.open(dest).source_run), formats="onnx_int8",
                                     out=str(dest)))
    assert result.formats["onnx_int8"]["status"] == "verified", result.formats["onnx_int8"]
    return dest


def _pixels(n: int = 24) -> np.ndarray:
    """Images around the fixture's red, green and blue, plus noise: raw 0..255 pixels at the model's 32x32."""
    rng = np.random.default_rng(7)
    hues = np.array([[220, 40, 40], [40, 200, 60], [40, 60, 220]])[np.arange(n) % 3]
    return np.clip(hues[:, None, None, :] + rng.integers(-60, 61, (n, 32, 32, 3)), 0, 255).astype(np.float32)


def test_the_served_file_comes_from_the_format_table():
    assert served_format("fp32") == "onnx" and served_format("int8") == "onnx_int8"
    assert FORMATS[served_format("int8")].file == "model_int8.onnx"


def test_int8_server_answers_close_to_the_fp32_server(int8_export):
    pixels = _pixels()
    answers, meta = {}, {}
    for precision in ("fp32", "int8"):
        with TestClient(create_app(Settings(export_dirs=(str(int8_export),), precision=precision))) as c:
            r = c.post("/v1/models/tiny:predict", json={"instances": pixels.tolist()})
            assert r.status_code == 200, r.text
            answers[precision] = np.array(r.json()["predictions"])
            meta[precision] = c.get("/v1/models/tiny/metadata").json()
    manifest = json.loads((int8_export / "manifest.json").read_text())["export"]["formats"]
    assert meta["int8"]["model"]["format"] == "onnx_int8" and meta["fp32"]["model"]["format"] == "onnx"
    assert meta["int8"]["model"]["sha256"] == manifest["onnx_int8"]["sha256"]
    fp32, int8 = answers["fp32"], answers["int8"]
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.9
    assert np.abs(fp32 - int8).max() < 0.2
    np.testing.assert_allclose(int8.sum(axis=1), 1.0, atol=1e-4)


def test_an_export_without_a_verified_int8_model_is_refused_in_one_line(export_dir, int8_export, tmp_path):
    with pytest.raises(UserError) as err:
        OnnxModel(ExportDir.open(export_dir), precision="int8")
    message = str(err.value)
    assert "export tiny has no verified onnx_int8 model (it has none)" in message and "\n" not in message
    assert "`transfer export RUN_DIR --formats onnx_int8`" in message
    failed = shutil.copytree(int8_export, tmp_path / "tiny")
    manifest = json.loads((failed / "manifest.json").read_text())
    manifest["export"]["formats"]["onnx_int8"]["status"] = "failed-verification"
    (failed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="it failed verification"):
        check_servable(ExportDir.open(failed), "int8")
    assert check_servable(ExportDir.open(failed), "fp32") == manifest["export"]["formats"]["onnx"]["sha256"]
    with pytest.raises(UserError, match="unknown --precision 'fp16'"):
        Settings(export_dirs=(str(export_dir),), precision="fp16")
