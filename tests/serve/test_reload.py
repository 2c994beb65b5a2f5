"""Hot reload of --model-repo (serve/repo.py): exports added, replaced (requests in flight finish on the old model),
removed, broken replacements that leave the old one serving (logs, /readyz, metrics), numbered versions.

Every wait polls for its condition up to a deadline; nothing is asserted about time.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_fixtures import CLASSES, permuted_copy, relabel_copy, rewrite_in_place

from export.contract import sha256_of
from serve.app import create_app
from serve.model import OnnxModel
from serve.settings import Settings
from transfer.errors import UserError

fastapi_testclient = pytest.importorskip("fastapi.testclient")
TestClient = fastapi_testclient.TestClient

POLL_S = 0.05
DEADLINE_S = 60
FRENCH = ("bleu", "vert", "rouge")  # CLASSES renamed: same model, other answers
GERMAN = ("blau", "gruen", "rot")
RACE_REQUESTS = 300  # :classify requests answered while the export is rewritten in place, again and again


def _png(rgb: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.array(rgb, np.uint8), (20, 20, 1))).save(buffer, format="PNG")
    return buffer.getvalue()


_RED = _png((220, 30, 30))


def _wait(condition, what: str):
    """``condition()``'s first truthy value, polled until DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what}")


def _swap_in(repo: Path, name: str, build) -> Path:
    """Replace ``repo/name`` whole, as the exporter does: built in a hidden staging folder, swapped in by renames."""
    staging, old, dest = repo / f".{name}.export-test", repo / f".{name}.old-test", repo / name
    build(staging)
    if dest.exists():
        os.replace(dest, old)
    os.replace(staging, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def _label(client, path: str = "/v1/models/alpha:classify"):
    r = client.post(f"{path}?top_k=1", content=_RED)
    return r.json()["predictions"][0][0]["label"] if r.status_code == 200 else r.status_code


def _metric(client, name: str, **labels) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts them
    match = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", client.get("/metrics").text, re.M)
    return float(match.group(1)) if match else None


def _detail(client) -> dict:
    r = client.get("/readyz")
    assert r.status_code == 200
    return r.json()["detail"]


@pytest.fixture
def repo(export_dir, tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    relabel_copy(export_dir, repo / "alpha", CLASSES)
    return repo


def _app(repo: Path):
    return create_app(Settings(model_repo=str(repo), repo_poll_s=POLL_S))


def test_added_replaced_and_removed_exports_take_effect_and_requests_in_flight_finish(repo, export_dir, monkeypatch):
    fast_run, gate, started = OnnxModel.run, threading.Event(), threading.Event()
    with TestClient(_app(repo)) as c:
        state = c.app.state.serve
        assert _label(c) == "red" and _label(c, "/v1/models/beta:classify") == 404

        _swap_in(repo, "beta", lambda d: relabel_copy(export_dir, d, GERMAN))
        assert _wait(lambda: _label(c, "/v1/models/beta:classify") == "rot", "beta to be served")
        assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["alpha", "beta"]
        assert _metric(c, "serve_model_reloads_total", model="beta") == 1

        old = state.served["alpha"]

        def gated_run(self, batch):  # the old alpha holds its batch until the test lets it go
            if self is old.model:
                started.set()
                gate.wait(DEADLINE_S)
            return fast_run(self, batch)

        monkeypatch.setattr(OnnxModel, "run", gated_run)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(c.post, "/v1/models/alpha:classify?top_k=1", content=_RED)
            assert started.wait(DEADLINE_S)
            _swap_in(repo, "alpha", lambda d: relabel_copy(export_dir, d, FRENCH))
            _wait(lambda: state.served["alpha"] is not old, "alpha to be replaced")  # (old alpha answers nobody new)
            assert _label(c) == "rouge"
            assert old.users == 1 and not old.batcher._task.done()  # still answering its request
            gate.set()
            r = in_flight.result(timeout=DEADLINE_S)
            assert r.status_code == 200 and r.json()["predictions"][0][0]["label"] == "red"  # the old model's
        _wait(lambda: old.batcher._task.done(), "the old batcher to stop once its request was answered")
        assert old.users == 0
        assert _metric(c, "serve_model_info", model="alpha", version="1",
                       manifest_sha256=sha256_of(repo / "alpha" / "manifest.json")) == 1
        assert _metric(c, "serve_model_info", model="alpha", version="1", manifest_sha256=old.manifest_sha256) is None

        shutil.rmtree(repo / "beta")
        assert _wait(lambda: _label(c, "/v1/models/beta:classify") == 404, "beta to be unloaded")
        assert c.get("/readyz").json()["models"] == ["alpha"]
        assert _label(c) == "rouge"


def test_a_broken_replacement_leaves_the_old_export_serving_and_says_so(repo, export_dir, caplog):
    caplog.set_level(logging.WARNING, logger="serve")
    with TestClient(_app(repo)) as c:
        assert _detail(c)["alpha"] == {"version": "1", "versions": ["1"],
                                       "manifest_sha256": sha256_of(repo / "alpha" / "manifest.json")}
        assert _metric(c, "serve_model_reload_failures_total", model="alpha") == 0

        def failures():
            return _metric(c, "serve_model_reload_failures_total", model="alpha")

        # 1. the ONNX file no longer matches the manifest's sha256 (changed in place)
        onnx = repo / "alpha" / "model.onnx"
        onnx.write_bytes(onnx.read_bytes() + b"tampered")
        _wait(lambda: failures() == 1, "the corrupt artifact to be refused")
        error = _detail(c)["alpha"]["reload_error"]
        assert "sha256" in error and str(repo) not in error  # no server paths on an open endpoint
        assert _label(c) == "red"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "alpha" in r.getMessage()]
        assert len(warnings) == 1 and "keeps serving" in warnings[0].getMessage()
        assert "\n" not in warnings[0].getMessage()

        # 2. an unreadable manifest
        (repo / "alpha" / "manifest.json").write_text("{not json", encoding="utf-8")
        _wait(lambda: failures() == 2, "the unreadable manifest to be refused")
        assert "manifest.json" in _detail(c)["alpha"]["reload_error"] and _label(c) == "red"

        # 3. an artifact ONNX Runtime cannot load, though its sha256 is the manifest's
        def not_onnx(dest: Path) -> None:
            relabel_copy(export_dir, dest, FRENCH)
            (dest / "model.onnx").write_bytes(b"not an ONNX model")
            manifest = json.loads((dest / "manifest.json").read_text())
            manifest["export"]["formats"]["onnx"]["sha256"] = sha256_of(dest / "model.onnx")
            (dest / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")

        _swap_in(repo, "alpha", not_onnx)
        _wait(lambda: failures() == 3, "the unloadable ONNX file to be refused")
        assert _detail(c)["alpha"]["reload_error"] and _label(c) == "red"
        assert c.get("/v1/models/alpha/metadata").json()["classes"] == list(CLASSES)

        # a good export clears the error
        _swap_in(repo, "alpha", lambda d: relabel_copy(export_dir, d, FRENCH))
        _wait(lambda: _label(c) == "rouge", "the good replacement to be served")
        assert "reload_error" not in _detail(c)["alpha"] and failures() == 3


def test_a_broken_new_export_is_not_served_until_it_is_fixed(repo, export_dir):
    with TestClient(_app(repo)) as c:
        def broken(dest: Path) -> None:
            relabel_copy(export_dir, dest, GERMAN)
            (dest / "model.onnx").write_bytes(b"truncated")

        _swap_in(repo, "gamma", broken)
        _wait(lambda: "gamma" in _detail(c), "the broken export to be reported")
        assert _detail(c)["gamma"]["versions"] == [] and "sha256" in _detail(c)["gamma"]["reload_error"]
        assert _label(c, "/v1/models/gamma:classify") == 404 and c.get("/readyz").json()["models"] == ["alpha"]
        assert _metric(c, "serve_model_reload_failures_total", model="gamma") == 1
        _swap_in(repo, "gamma", lambda d: relabel_copy(export_dir, d, GERMAN))
        _wait(lambda: _label(c, "/v1/models/gamma:classify") == "rot", "the fixed export to be served")
        assert "reload_error" not in _detail(c)["gamma"]
        shutil.rmtree(repo / "gamma")
        _swap_in(repo, "gamma", broken)  # gone and back broken: reported again
        _wait(lambda: "reload_error" in _detail(c).get("gamma", {}), "the broken export to be reported again")


def test_a_model_rewritten_between_its_check_and_its_load_is_not_served(repo, export_dir, tmp_path, monkeypatch):
    """The race of issue 19 made certain: model.onnx is rewritten in place with other weights the instant before ONNX
    Runtime opens the session, after its sha256 was checked. What is served is what was checked (A's weights with the
    manifest's labels: "rouge"), never the new bytes under the checked digest (B's weights, FRENCH labels: "vert")."""
    import onnxruntime as ort

    french = relabel_copy(export_dir, tmp_path / "a-fr", FRENCH)  # A's weights (same model.onnx bytes)
    b = permuted_copy(export_dir, tmp_path / "b", (1, 2, 0), ("gruen", "rot", "blau"))
    alpha, opened, armed = repo / "alpha", ort.InferenceSession, threading.Event()

    def racing_session(model, *args, **kwargs):
        if armed.is_set():
            armed.clear()
            rewrite_in_place(alpha, b, ("model.onnx",))  # after the check, before the runtime reads anything
        return opened(model, *args, **kwargs)

    with TestClient(_app(repo)) as c:
        assert _label(c) == "red"
        monkeypatch.setattr(ort, "InferenceSession", racing_session)
        armed.set()
        rewrite_in_place(alpha, french)
        answer = _wait(lambda: (lambda label: label if label != "red" else None)(_label(c)), "the reload")
        assert answer == "rouge"  # "vert" would be the manifest's labels on the weights written after the check
        assert not armed.is_set()  # the race did happen
        served = c.app.state.serve.served["alpha"].model
        assert served.sha256 == sha256_of(french / "model.onnx") != sha256_of(alpha / "model.onnx")
        # the half-written export on disk (B's model, A's manifest) is refused; what was checked keeps serving
        _wait(lambda: "sha256" in _detail(c)["alpha"].get("reload_error", ""), "the mismatched model to be refused")
        assert _label(c) == "rouge"


def test_an_export_rewritten_in_place_never_serves_one_exports_labels_with_the_others_weights(repo, export_dir,
                                                                                              tmp_path):
    """Issue 19: model.onnx was hashed by path and opened by path again, so a file rewritten in place between the two
    reads served one export's labels with the other's weights, under the sha256 on disk. Exports A and B are
    designed so that each answer names what produced it: a red image is "red" under A (labels and weights) and
    "rot" under B; A's labels with B's weights say "green", B's labels with A's weights "blau"."""
    a = relabel_copy(export_dir, tmp_path / "a", CLASSES)
    b = permuted_copy(export_dir, tmp_path / "b", (1, 2, 0), ("gruen", "rot", "blau"))
    consistent, mixed = {"red", "rot"}, {"green", "blau"}
    alpha, done, rewrites = repo / "alpha", threading.Event(), []

    def writer() -> None:  # A, B, A, ... in place until the requests are done, then B (the last word)
        while not done.is_set():
            rewrite_in_place(alpha, (a, b)[len(rewrites) % 2])
            rewrites.append(1)
            time.sleep(0.01)
        rewrite_in_place(alpha, b)

    answers: dict = {}
    with TestClient(_app(repo)) as c:
        state = c.app.state.serve
        with ThreadPoolExecutor(1) as pool:
            writing = pool.submit(writer)
            try:
                for _ in range(RACE_REQUESTS):
                    label = _label(c)
                    answers[label] = answers.get(label, 0) + 1
            finally:
                done.set()
            writing.result(timeout=DEADLINE_S)
        assert set(answers) <= consistent | mixed, answers  # every request was answered, by one export or a mix
        assert not mixed & set(answers), f"labels of one export with the weights of the other: {answers}"
        # once the writer has stopped, B is served, under B's sha256 (not the wrong weights under the right digest)
        _wait(lambda: _label(c) == "rot", "the last export written to be served")
        assert state.served["alpha"].model.sha256 == sha256_of(alpha / "model.onnx") == sha256_of(b / "model.onnx")
        assert c.get("/v1/models/alpha/metadata").json()["classes"] == ["gruen", "rot", "blau"]
        assert len(rewrites) > 1 and _metric(c, "serve_model_reloads_total", model="alpha") >= 1


def test_numbered_versions_serve_the_highest_as_latest_and_each_by_number(export_dir, tmp_path):
    repo = tmp_path / "repo"
    (repo / "multi").mkdir(parents=True)
    relabel_copy(export_dir, repo / "multi" / "1", CLASSES)
    relabel_copy(export_dir, repo / "multi" / "2", FRENCH)
    (repo / "multi" / "3").mkdir()  # no manifest yet: not a complete export, not served
    multi = "/v1/models/multi:classify"
    with TestClient(_app(repo)) as c:
        assert _label(c, multi) == "rouge"
        assert _label(c, "/v1/models/multi/versions/1:classify") == "red"
        assert _label(c, "/v1/models/multi/versions/2:classify") == "rouge"
        assert _label(c, "/v1/models/multi/versions/3:classify") == 404
        assert c.get("/v1/models/multi/versions/1/metadata").json()["version"] == "1"
        status = c.get("/v1/models/multi").json()["model_version_status"]
        assert [s["version"] for s in status] == ["1", "2"]
        assert [s["version"] for s in c.get("/v1/models/multi/versions/1").json()["model_version_status"]] == ["1"]
        assert c.get("/v1/models/multi/versions/7").status_code == 404
        assert c.get("/v2/models/multi").json()["versions"] == ["1", "2"]
        assert c.get("/v2/models/multi/versions/1/ready").json()["ready"] is True
        assert c.get("/v2/models/multi/versions/9/ready").status_code == 404
        pixels = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 32, 32, 3],
                              "data": [0.0] * (32 * 32 * 3)}]}
        assert c.post("/v2/models/multi/infer", json=pixels).json()["model_version"] == "2"
        assert c.post("/v2/models/multi/versions/1/infer", json=pixels).json()["model_version"] == "1"

        relabel_copy(export_dir, repo / "multi" / ".3.tmp", GERMAN)
        shutil.rmtree(repo / "multi" / "3")
        os.replace(repo / "multi" / ".3.tmp", repo / "multi" / "3")
        _wait(lambda: _label(c, multi) == "rot", "version 3 to become the latest")
        assert _label(c, "/v1/models/multi/versions/1:classify") == "red"
        assert _detail(c)["multi"]["versions"] == ["1", "2", "3"]

        def broken(dest: Path) -> None:
            relabel_copy(export_dir, dest, GERMAN)
            (dest / "model.onnx").write_bytes(b"truncated")

        broken(repo / "multi" / "4")
        _wait(lambda: "reload_error" in _detail(c)["multi"], "the broken version 4 to be reported")
        assert _detail(c)["multi"]["reload_error"].startswith("version 4: ")
        assert _detail(c)["multi"]["version"] == "3" and _label(c, multi) == "rot"

        shutil.rmtree(repo / "multi" / "4")
        shutil.rmtree(repo / "multi" / "3")
        _wait(lambda: _label(c, multi) == "rouge", "version 2 to be the latest again")
        assert _label(c, "/v1/models/multi/versions/3:classify") == 404
        assert _detail(c)["multi"] == {"version": "2", "versions": ["1", "2"],
                                       "manifest_sha256": sha256_of(repo / "multi" / "2" / "manifest.json")}


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_the_poll_interval_is_checked(export_dir, value):
    with pytest.raises(UserError, match="repo-poll-s"):
        Settings(model_repo=str(export_dir), repo_poll_s=value)


def test_the_fingerprint_follows_every_listed_artifact(tmp_path):
    """Whichever --precision serves, an artifact replaced in place (manifest unchanged) is noticed."""
    import json as _json

    from serve.repo import fingerprint

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "manifest.json").write_text(_json.dumps({"export": {"formats": {
        "onnx": {"file": "model.onnx"}, "onnx_int8": {"file": "model_int8.onnx"}}}}))
    for name in ("labels.txt", "model.onnx", "model_int8.onnx"):
        (folder / name).write_bytes(b"x")
    before = fingerprint(folder)
    (folder / "model_int8.onnx").write_bytes(b"xy")
    after_int8 = fingerprint(folder)
    assert after_int8 != before
    (folder / "model.onnx").write_bytes(b"xyz")
    assert fingerprint(folder) != after_int8
    (folder / "manifest.json").write_text("not json")  # never raises
    assert fingerprint(folder)
