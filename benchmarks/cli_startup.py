"""How long the CLI takes to answer without doing work, side by side with ``python -c "import numpy"``.

    python benchmarks/cli_startup.py [--runs 7]

Prints the median wall time of each command over --runs runs (interleaved, so machine noise hits all alike), its
ratio to importing NumPy, and whether ``python -X importtime`` shows TensorFlow or Keras among the imports. No
assertions: the numbers are for reading (the tests check that parsing imports no TensorFlow).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c 'import numpy'": [sys.executable, "-c", "import numpy"],
    "transfer --help": [sys.executable, "-m", "transfer", "--help"],
    "transfer finetune --help": [sys.executable, "-m", "transfer", "finetune", "--help"],
    "transfer finetune --epochs x (a typo)": [sys.executable, "-m", "transfer", "finetune", "--epochs", "x"],
    "transfer serve --help": [sys.executable, "-m", "transfer", "serve", "--help"],
}


def heavy_imports(argv: list[str]) -> list[str]:
    """Top-level heavy packages that ``-X importtime`` shows for ``argv``."""
    done = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True)
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    return sorted(names & {"tensorflow", "keras", "tf_keras", "onnxruntime", "fastapi"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, argv in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(argv, capture_output=True)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["python -c 'import numpy'"])
    print(f"{'command':<42}{'median s':>10}{'x numpy':>9}  heavy imports")
    for name, argv in COMMANDS.items():
        median = statistics.median(times[name])
        heavy = ", ".join(heavy_imports(argv)) or "none"
        print(f"{name:<42}{median:>10.3f}{median / base:>9.1f}  {heavy}")


if __name__ == "__main__":
    main()
