"""transfer/rundir.py: claiming a run directory (new / resume / complete), refusals, atomic JSON."""

from __future__ import annotations

import json
import os

import pytest

from transfer import rundir
from transfer.errors import UserError

CONFIG = {"kind": "finetune", "train": {"epochs": 3, "lr": 0.001}, "data": {"dataset": "synthetic"}}


def test_new_then_resume_then_complete(tmp_path):
    run = tmp_path / "runs" / "a"
    assert rundir.prepare(run, CONFIG) == "new"
    assert json.loads((run / rundir.CONFIG).read_text()) == CONFIG
    assert rundir.prepare(run, json.loads(json.dumps(CONFIG))) == "resume"  # same config: resume, untouched
    assert not rundir.is_complete(run)
    rundir.write_json(run / rundir.MANIFEST, {"status": "complete"})
    assert rundir.prepare(run, CONFIG) == "complete" and rundir.is_complete(run)
    assert rundir.load_complete(run) == {"status": "complete"}


def test_a_different_config_is_refused_and_names_the_difference(tmp_path):
    run = tmp_path / "runs" / "a"
    rundir.prepare(run, CONFIG)
    changed = {**CONFIG, "train": {"epochs": 4, "lr": 0.001}}
    with pytest.raises(UserError, match=r"train\.epochs: 3 -> 4.*--name NEW.*--overwrite"):
        rundir.prepare(run, changed)
    assert json.loads((run / rundir.CONFIG).read_text()) == CONFIG  # nothing was touched
    assert rundir.prepare(run, changed, overwrite=True) == "new"
    assert json.loads((run / rundir.CONFIG).read_text())["train"]["epochs"] == 4


def test_a_folder_that_is_not_a_run_is_never_touched(tmp_path):
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a run directory"):
        rundir.prepare(run, CONFIG)
    assert (run / "notes.txt").read_text() == "keep me"


def test_non_writer_workers_only_check(tmp_path):
    run = tmp_path / "runs" / "a"
    assert rundir.prepare(run, CONFIG, write=False) == "new" and not run.exists()
    rundir.prepare(run, CONFIG)
    assert rundir.prepare(run, CONFIG, write=False) == "resume"
    with pytest.raises(UserError, match="different config"):
        rundir.prepare(run, {**CONFIG, "kind": "baseline"}, write=False)


def test_missing_and_incomplete_runs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        rundir.load_complete(tmp_path / "nope")
    rundir.prepare(tmp_path / "half", CONFIG)
    with pytest.raises(UserError, match="incomplete"):
        rundir.load_complete(tmp_path / "half")
    (tmp_path / "half" / rundir.MANIFEST).write_text("{broken")
    assert not rundir.is_complete(tmp_path / "half")


def test_write_json_is_atomic_and_readable_by_others_as_the_umask_says(tmp_path):
    path = tmp_path / "x" / "data.json"
    old = os.umask(0o022)
    try:
        rundir.write_json(path, {"b": 1, "a": [1, 2]})
        assert path.stat().st_mode & 0o777 == 0o644  # group and others can read (a container's non-root user)
        os.umask(0o077)
        rundir.write_json(path, {"private": True})
        assert path.stat().st_mode & 0o777 == 0o600  # a user who asked for private files gets them
    finally:
        os.umask(old)
    assert rundir.read_json(path) == {"private": True}
    assert [p.name for p in path.parent.iterdir()] == ["data.json"]
