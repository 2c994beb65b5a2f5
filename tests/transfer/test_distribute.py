"""Distributed training with tf.distribute: mirrored over two logical CPUs, and two multi-worker processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = ["--backbone", "mobilenetv2", "--weights", "none", "--image-size", "32", "--unfreeze", "all",
        "--head-epochs", "0", "--synthetic-train", "128", "--synthetic-test", "32", "--batch-size", "32",
        "--no-tensorboard", "--patience", "50"]
TWO_CPUS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from transfer.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_mirrored_training_over_two_logical_cpus(tmp_path):
    args = ["finetune", *TINY, "--epochs", "1", "--strategy", "mirrored", "--artifacts", str(tmp_path),
            "--name", "mirrored"]
    result = subprocess.run([sys.executable, "-c", TWO_CPUS, *args], capture_output=True, text=True,
                            env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "strategy: mirrored (MirroredStrategy) with 2 replicas" in result.stdout
    manifest = json.loads((tmp_path / "runs" / "mirrored" / "manifest.json").read_text())
    assert manifest["status"] == "complete"


def _workers(tmp_path: Path, name: str, epochs: int, ports: list[int]) -> list[subprocess.Popen]:
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    procs = []
    for index in range(len(ports)):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        log = open(tmp_path / f"{name}-worker{index}.log", "a")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "transfer", "finetune", *TINY, "--epochs", str(epochs), "--strategy",
             "multi-worker", "--artifacts", str(tmp_path / "shared"), "--name", name],
            stdout=log, stderr=subprocess.STDOUT, env=_env(TF_CONFIG=tf_config)))
    return procs


def _wait(procs, timeout=600) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for proc in procs:
        codes.append(proc.wait(timeout=max(deadline - time.time(), 1)))
    return codes


@pytest.mark.slow
def test_multi_worker_trains_writes_once_and_resumes_after_a_worker_is_killed(tmp_path):
    run = tmp_path / "shared" / "runs" / "mw"
    state = run / "checkpoints" / "state.json"
    procs = _workers(tmp_path, "mw", epochs=5, ports=_free_ports(2))
    deadline = time.time() + 400
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["epoch"] >= 2):
        assert all(p.poll() is None for p in procs), (tmp_path / "mw-worker0.log").read_text()[-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)  # a worker dies; the chief blocks in its next collective
    procs[0].send_signal(signal.SIGKILL)
    _wait(procs)
    done = json.loads(state.read_text())["epoch"]
    assert 2 <= done < 5 and not (run / "manifest.json").exists()

    restarted = _workers(tmp_path, "mw", epochs=5, ports=_free_ports(2))
    codes = _wait(restarted)
    chief_log = (tmp_path / "mw-worker0.log").read_text()
    assert codes == [0, 0], chief_log[-3000:]
    assert f"resuming from checkpoint: {done} epochs done" in chief_log
    assert "strategy: multi-worker (CollectiveAllReduceStrategy) with 2 replicas" in chief_log
    assert "worker done" in (tmp_path / "mw-worker1.log").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["epochs_run"] == 5
    history = (run / "history.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in history] == [1, 2, 3, 4, 5]
    # only the chief wrote: nothing else appeared under the shared artifacts directory
    assert sorted(p.name for p in (tmp_path / "shared" / "runs").iterdir()) == ["mw"]
