"""Does a run killed with SIGKILL mid-schedule resume to the history of the same run left alone? On a real folder.

    python benchmarks/resume_check.py [--kill-after 3] [--epochs 5] [--image-size 48] [--out DIR]

The folder is scikit-learn's ``digits`` (1,797 real 8x8 handwritten digits, upscaled to 32x32 PNGs:
class_weight_study.make_folder with every class kept). There are no ImageNet weights offline, and a randomly
initialised backbone whose lower blocks stay frozen learns nothing, so a source run first trains MobileNetV2 from
scratch on the folder (``--unfreeze all``, 5 epochs: ~96 % test accuracy), and the recipe under test starts from it
with what resume has to carry across a kill: ``transfer finetune --backbone mobilenetv2 --weights SOURCE_RUN --augment
light --head-epochs 1 --epochs E --unfreeze blocks:1 --unfreeze-schedule blocks:2@1,blocks:4@3 --layer-decay 0.7
--optimizer sgd`` (MobileNetV2's head has Dropout; the schedule recompiles with a fresh optimizer per phase). It runs
once uninterrupted, and once in its own subprocess that gets SIGKILL as soon as ``checkpoints/state.json`` records
``--kill-after`` epochs, then the same command again.

Prints both histories side by side and whether every column but ``seconds`` is identical, to the last digit; exits 1
when any differs. The two runs share the machine one after the other, so their timings are not compared.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
COLUMNS = ("phase", "loss", "accuracy", "val_loss", "val_accuracy", "lr")


def source_command(folder: Path, artifacts: Path, args) -> list[str]:
    return [sys.executable, "-m", "transfer", "finetune", "--backbone", "mobilenetv2", "--weights", "none",
            "--dataset", f"folder:{folder}", "--image-size", str(args.image_size), "--augment", "none",
            "--unfreeze", "all", "--head-epochs", "0", "--epochs", "5", "--optimizer", "sgd", "--fine-tune-lr", "0.05",
            "--seed", str(args.seed), "--no-tensorboard", "--artifacts", str(artifacts), "--name", "source"]


def recipe(folder: Path, artifacts: Path, source: Path, args) -> list[str]:
    return [sys.executable, "-m", "transfer", "finetune", "--backbone", "mobilenetv2", "--weights", str(source),
            "--dataset", f"folder:{folder}", "--image-size", str(args.image_size), "--augment", "light",
            "--head-epochs", "1", "--epochs", str(args.epochs), "--patience", "100", "--unfreeze", "blocks:1",
            "--lr", str(args.lr), "--fine-tune-lr", str(args.lr), "--optimizer", "sgd",
            "--unfreeze-schedule", "blocks:2@1,blocks:4@3", "--layer-decay", "0.7", "--seed", str(args.seed),
            "--no-tensorboard", "--artifacts", str(artifacts), "--name", "resume-check"]


def history(artifacts: Path) -> list[dict]:
    with open(artifacts / "runs" / "resume-check" / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def run_killed(cmd: list[str], artifacts: Path, kill_after: int, env: dict) -> int:
    """Start ``cmd``, SIGKILL it once its state.json records ``kill_after`` epochs; returns the epochs recorded."""
    state = artifacts / "runs" / "resume-check" / "checkpoints" / "state.json"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        try:
            if json.loads(state.read_text())["epoch"] >= kill_after:
                break
        except (OSError, ValueError, KeyError):
            pass
        if proc.poll() is not None:
            sys.exit(f"the run ended (exit {proc.returncode}) before epoch {kill_after}: "
                     f"{proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(state.read_text())["epoch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-after", type=int, default=3, help="SIGKILL once this many epochs are checkpointed")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (after 1 head epoch)")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.01, help="--lr and --fine-tune-lr (SGD with momentum)")
    parser.add_argument("--out", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from class_weight_study import make_folder

    root = args.out or Path(tempfile.mkdtemp(prefix="resume-check-"))
    folder = root / "digits"
    if not folder.exists():
        make_folder(folder, keep_rare=1.0, seed=args.seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole, killed = root / "whole", root / "killed"
    started = time.monotonic()
    done = subprocess.run(source_command(folder, root / "source", args), capture_output=True, text=True, env=env)
    if done.returncode:  # an existing complete source run is reused: the command says so and exits 0
        sys.exit(f"the source run failed (exit {done.returncode}): {done.stderr[-2000:]}")
    source = root / "source" / "runs" / "source"

    def command(folder, artifacts, args):
        return recipe(folder, artifacts, source, args)

    done = subprocess.run(command(folder, whole, args), capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"the uninterrupted run failed (exit {done.returncode}): {done.stderr[-2000:]}")
    at = run_killed(command(folder, killed, args), killed, args.kill_after, env)
    again = subprocess.run(command(folder, killed, args), capture_output=True, text=True, env=env)
    if again.returncode:
        sys.exit(f"the resumed run failed (exit {again.returncode}): {again.stderr[-2000:]}")
    resumed_line = next((line for line in again.stdout.splitlines() if line.startswith("resuming from")), "(none)")
    a, b = history(whole), history(killed)
    print(f"folder: {folder} (digits, {args.image_size} px); killed with SIGKILL after epoch {at}; "
          f"the second command printed: {resumed_line}")
    print(f"{'epoch':>5}  {'phase':<12} {'loss (whole)':>14} {'loss (resumed)':>14} {'val_acc (whole)':>15} "
          f"{'val_acc (resumed)':>17}  same")
    differ = len(a) != len(b)
    for row_a, row_b in zip(a, b, strict=False):
        same = all(row_a[c] == row_b[c] for c in COLUMNS)
        differ |= not same
        after = " (after the kill)" if int(row_a["epoch"]) > at else ""
        print(f"{row_a['epoch']:>5}  {row_a['phase']:<12} {row_a['loss']:>14.12} {row_b['loss']:>14.12} "
              f"{row_a['val_accuracy']:>15.8} {row_b['val_accuracy']:>17.8}  {'yes' if same else 'NO'}{after}")
    test = json.loads((whole / "runs" / "resume-check" / "evaluation.json").read_text())["accuracy"]
    again_test = json.loads((killed / "runs" / "resume-check" / "evaluation.json").read_text())["accuracy"]
    print(f"test accuracy: {test:.4f} uninterrupted, {again_test:.4f} killed and resumed")
    differ |= test != again_test
    print(f"{len(a)} and {len(b)} epochs; every column but seconds identical: {'no' if differ else 'yes'} "
          f"({time.monotonic() - started:.0f} s in all)")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
