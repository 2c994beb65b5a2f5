"""The documented Docker deployment, without Docker: the Dockerfile's own install lines in a fresh virtual environment
(no TensorFlow), serving a read-only export as the image's non-root user (uid 10001)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UID = 10001  # the Dockerfile's `useradd --uid 10001 serve`


def dockerfile_installs() -> list[list[str]]:
    """The arguments of each ``pip install`` in the Dockerfile's RUN lines (continuations joined)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    installs = []
    for line in text.splitlines():
        if not line.startswith("RUN "):
            continue
        for part in line[4:].split("&&"):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                installs.append([w for w in words[2:] if not w.startswith("--prefix") and w != "--no-cache-dir"])
    return installs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user(argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", *argv]


@pytest.fixture(scope="module")
def public_dir():
    """A directory others may enter (pytest's own tmp dirs are 0700), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="transfer-deploy-"))
    path.chmod(0o755)
    yield path
    for p in _own_entries(path):  # read-only files and folders of the test: make them removable again
        p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(path, ignore_errors=True)


def _own_entries(root: Path) -> list[Path]:
    """Every file and folder below ``root`` except symbolic links: chmod follows links, and a venv's bin/python links
    to the system interpreter, which must never be touched."""
    return [p for p in root.rglob("*") if not p.is_symlink()]


@pytest.fixture(scope="module")
def read_only_export(public_dir):
    from transfer.cli import main

    art = public_dir / "artifacts"
    assert main(["baseline", "--model", "lenet5", "--dataset", "synthetic", "--synthetic-train", "100",
                 "--synthetic-test", "30", "--epochs", "1", "--no-tensorboard", "--artifacts", str(art),
                 "--name", "tiny"]) == 0
    export = art / "exports" / "tiny"
    assert main(["export", str(art / "runs" / "tiny"), "--formats", "onnx", "--out", str(export)]) == 0
    for p in [export, *_own_entries(export)]:  # what the toolkit wrote, as written: readable by others?
        mode = p.stat().st_mode & 0o777
        assert mode & 0o004 and (not p.is_dir() or mode & 0o001), (p, oct(mode))
    for p in [*_own_entries(export), export]:  # a read-only mount
        p.chmod(p.stat().st_mode & ~0o222)
    return export


def _serve_and_classify(python: str, export: Path, tmp_path: Path) -> dict:
    port = _free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115  (closed below, after the server stops)
    server = subprocess.Popen(_as_user([python, "-m", "serve", str(export), "--port", str(port)]),
                              stdout=log, stderr=subprocess.STDOUT, cwd="/")
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        from PIL import Image

        png = tmp_path / "x.png"
        Image.new("RGB", (40, 30), (200, 20, 20)).save(png)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/tiny:classify?top_k=1",
                                         data=png.read_bytes(), headers={"content-type": "image/png"})
        with urllib.request.urlopen(request, timeout=30) as r:
            import json

            return {"status": r.status, "body": json.loads(r.read()), "pid": server.pid}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _runs_as_user(python: str) -> bool:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    return subprocess.run(_as_user([python, "-c", "import numpy"]), capture_output=True, cwd="/").returncode == 0


def test_the_dockerfile_installs_are_what_serve_needs():
    installs = dockerfile_installs()
    assert len(installs) == 2 and installs[1] == ["--no-deps", "."]
    names = {re.split(r"[<>=; ]", req, maxsplit=1)[0] for req in installs[0]}
    assert {"onnxruntime", "fastapi", "uvicorn", "pillow", "numpy"} <= names and "tensorflow" not in names
    copied = re.findall(r"^COPY (\w+)/ ", (ROOT / "Dockerfile").read_text(), re.M)
    assert set(copied) == {"transfer", "export", "serve"}  # every package serve imports from


def test_a_non_root_user_serves_a_read_only_export(read_only_export, tmp_path):
    if not _runs_as_user(sys.executable):
        pytest.skip("needs root and setpriv, and an interpreter uid 10001 may run")
    answer = _serve_and_classify(sys.executable, read_only_export, tmp_path)
    assert answer["status"] == 200 and answer["body"]["predictions"][0][0]["label"]


@pytest.mark.slow
def test_the_dockerfile_install_serves_without_tensorflow_as_non_root(read_only_export, public_dir, tmp_path):
    """The image's install, reproduced in a fresh venv: no TensorFlow, `python -m serve` answers as uid 10001."""
    venv = public_dir / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    first, package = dockerfile_installs()
    subprocess.run([*pip, *first], check=True, timeout=900)
    build = public_dir / "src"  # a copy, so the checkout gets no build/ folder
    shutil.copytree(ROOT, build, ignore=shutil.ignore_patterns(".git", ".venv", ".ci-venv", "artifacts", "build",
                                                               "*.egg-info", "__pycache__", "tests"))
    subprocess.run([*pip, *package], check=True, timeout=900, cwd=build)
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import serve.app, export.runtimes, transfer.cli, sys\n"
                            "import importlib.util as u; print(u.find_spec('tensorflow') is None)"],
                           capture_output=True, text=True, cwd="/")
    assert probe.stdout.strip() == "True", probe.stderr  # the image has no TensorFlow, and serve needs none
    for p in [venv, *_own_entries(venv)]:
        if p.is_dir():
            p.chmod(0o755)
    if not _runs_as_user(python):
        pytest.skip("needs root and setpriv to run as uid 10001")
    answer = _serve_and_classify(python, read_only_export, tmp_path)
    assert answer["status"] == 200 and answer["body"]["model"] == "tiny"
