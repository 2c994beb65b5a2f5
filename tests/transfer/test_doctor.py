"""`transfer doctor`: versions, caches and known incompatibilities, each problem with its next command."""

from __future__ import annotations

import json

from transfer import doctor
from transfer.cli import main


def test_doctor_reports_versions_caches_and_next_steps(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(doctor, "reachable", lambda host, timeout=2.0: False)
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["tensorflow"] and report["versions"]["keras"].startswith("3.")
    assert report["imagenet_weights_cached"] == {name: False for name in doctor.CORE_BACKBONES}
    problems = {item["problem"]: item["next"] for item in report["problems"]}
    offline = next(step for problem, step in problems.items() if problem.startswith("offline and no ImageNet"))
    assert str(tmp_path / "models") in offline and "--weights" in offline
    assert any("--dataset synthetic" in step for step in problems.values())


def test_cached_weights_are_seen(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    path = doctor.BACKBONES["vgg16"].weights_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"h5")
    report = doctor.diagnose(network=False)
    assert report["imagenet_weights_cached"]["vgg16"] is True
    assert report["hosts_reachable"] == {}


def test_incompatibility_rules_fire_on_bad_version_sets():
    versions = {package: "2.21.0" for package in doctor.PACKAGES}
    versions.update({"keras": "3.15.0", "numpy": "2.1.0", "tf-keras": "2.20.0"})
    fired = [rule.text for rule in doctor.RULES if rule.broken(versions)]
    assert fired == ["tf-keras must match TensorFlow's major.minor (tensorflow-hub loads through it)"]
    versions.update({"tensorflow": "2.16.1", "tf-keras": "2.16.0", "keras": "2.15.0"})
    fired = [rule.text for rule in doctor.RULES if rule.broken(versions)]
    assert "Keras 2 is installed; the toolkit needs Keras 3" in fired
    assert "NumPy 2 needs TensorFlow 2.18 or newer" in fired
