"""The README's first commands stay true: CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_install_and_main_job_then_tests():
    install_and_run, tests = _readme_commands()[:2]
    assert 'pip install -e ".[dev]"' in install_and_run and "transfer " in install_and_run
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    test_command = _readme_commands()[1].split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci]
    assert 'pip install --quiet -e ".[dev]"' in (ROOT / ".ci" / "run").read_text()


def _readme_transfer_commands() -> list[list[str]]:
    import shlex

    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # environment assignments such as TF_CONFIG=...
                if words and words[0] == "transfer":
                    commands.append(words[1:])
    return commands


def test_every_readme_command_parses_with_the_real_cli():
    from transfer.cli import build_parser

    parser = build_parser()
    commands = _readme_transfer_commands()
    shown = {words[0] for words in commands}
    assert {"pipeline", "finetune", "baseline", "compare", "export", "verify", "bench", "predict", "serve"} <= shown
    for words in commands:
        args = parser.parse_args(words)  # an unknown flag or bad choice exits here and fails the test
        assert args.command == words[0]


def test_readme_configs_exist():
    for path in re.findall(r"configs/[\w.-]+\.toml", (ROOT / "README.md").read_text()):
        assert (ROOT / path).is_file(), path
