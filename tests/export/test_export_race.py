"""Two exports into one new --out (issue 19): the loser of the race is refused with one line (exit 2) instead of
both exiting 0 and the last to commit silently replacing the other (export/exporter.py, _OutLock and the commit's
re-check). The exports themselves are stand-ins (no model is trained): what is tested is how they commit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export import exporter
from export.contract import MANIFEST, SECTION
from transfer.cli import main
from transfer.errors import UserError


def _fake_run(tmp_path: Path, name: str) -> Path:
    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    return run


def _manifest(run_dir: Path) -> dict:
    return {"name": run_dir.name, SECTION: {"source_run": str(run_dir.resolve()), "formats": {}}}


@pytest.fixture
def stand_in(monkeypatch):
    """run_export with the run's manifest and the work in the staging directory stood in for: ``during`` (run while
    the export is between its first look at --out and its commit) says what happens meanwhile."""
    during: list = []

    def load_complete(run_dir):
        return {"name": Path(run_dir).name}

    def export_into(stage, out, cfg, run_dir, source, rows, previous):
        manifest = _manifest(run_dir)
        (stage / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
        while during:
            during.pop(0)()
        return manifest, {}

    monkeypatch.setattr(exporter.rundir, "load_complete", load_complete)
    monkeypatch.setattr(exporter, "_export_into", export_into)
    return during


def _source_of(out: Path) -> str:
    return Path(json.loads((out / MANIFEST).read_text())[SECTION]["source_run"]).name


def test_a_second_export_into_the_same_out_while_one_runs_is_one_line_exit_2(tmp_path, stand_in, capsys):
    run_a, run_b, out = _fake_run(tmp_path, "a"), _fake_run(tmp_path, "b"), tmp_path / "exports" / "shared"
    codes = []
    stand_in.append(lambda: codes.append(main(["export", str(run_b), "--formats", "onnx", "--out", str(out)])))
    assert main(["export", str(run_a), "--formats", "onnx", "--out", str(out)]) == 0
    assert codes == [2]  # b, started while a was exporting, lost the race: refused before writing anything
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "being written by another export" in err and "--out DIR" in err
    assert _source_of(out) == "a"
    assert sorted(p.name for p in out.parent.iterdir()) == ["shared"]  # no lock, no staging directory left
    # once a has finished, b is refused as before (another run's export) and with --overwrite replaces it
    assert main(["export", str(run_b), "--formats", "onnx", "--out", str(out)]) == 2
    assert "holds an export of another run" in capsys.readouterr().err
    assert main(["export", str(run_b), "--formats", "onnx", "--out", str(out), "--overwrite"]) == 0
    assert _source_of(out) == "b" and sorted(p.name for p in out.parent.iterdir()) == ["shared"]


def test_the_commit_does_not_replace_what_another_writer_committed_meanwhile(tmp_path, stand_in, monkeypatch,
                                                                           capsys):
    """Where the lock cannot be taken (no flock), the commit re-checks --out: another export committed into it
    meanwhile is kept and this one is refused (one line, exit 2), nothing of it left behind."""
    monkeypatch.setattr(exporter._OutLock, "acquire", lambda self: False)
    run_a, run_b, out = _fake_run(tmp_path, "a"), _fake_run(tmp_path, "b"), tmp_path / "exports" / "shared"

    def b_commits() -> None:  # the other writer: b's export appears at --out between a's look and a's commit
        out.mkdir()
        (out / MANIFEST).write_text(json.dumps(_manifest(run_b)), encoding="utf-8")

    stand_in.append(b_commits)
    assert main(["export", str(run_a), "--formats", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was written by another export while this one ran" in err
    assert _source_of(out) == "b" and sorted(p.name for p in out.parent.iterdir()) == ["shared"]

    # the same when --out held an export already and was replaced meanwhile (a re-export of a over b's)
    stand_in.append(lambda: (out / MANIFEST).write_text(json.dumps(_manifest(run_a) | {"x": 1}), encoding="utf-8"))
    with pytest.raises(UserError, match="written by another export"):
        exporter.run_export(exporter.ExportConfig(run_dir=str(run_b), formats="onnx", out=str(out)))
    assert json.loads((out / MANIFEST).read_text())["x"] == 1


def test_the_lock_is_held_only_while_an_export_runs(tmp_path):
    out = tmp_path / "shared"
    first = exporter._OutLock(out)
    assert first.acquire()
    with pytest.raises(UserError, match="being written by another export"):
        exporter._OutLock(out).acquire()
    first.release()
    assert not (tmp_path / ".shared.lock").exists()
    second = exporter._OutLock(out)
    assert second.acquire()
    second.release()
