"""``--config FILE`` for every command: TOML option values under the flags, and the replayable copy a run keeps.

Keys are the command's long option names (``image-size`` or ``image_size``), at the top level or in any table
(``[model]``, ``[train]``... — tables only group them). Flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import tomllib

from transfer.errors import UserError, unknown

CONFIG_DEST = "config_file"
# Not replayed: where the options came from, and the one flag that would destroy the run being replayed.
NOT_REPLAYED = {CONFIG_DEST, "func", "command", "overwrite"}


def _optional_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}


def load_options(path: str, parser: argparse.ArgumentParser) -> dict:
    """Option values from a TOML file, checked against ``parser``'s options and converted to their types."""
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise UserError(f"--config '{path}' does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"--config '{path}' is not valid TOML ({exc})") from exc
    actions = _optional_actions(parser)
    values = {}
    for key, value in _flatten(table):
        dest = key.replace("-", "_")
        if dest not in actions or dest in NOT_REPLAYED:
            raise unknown(f"option in {path}", key, [d.replace("_", "-") for d in actions if d not in NOT_REPLAYED])
        values[dest] = _convert(actions[dest], value, key, path)
    return values


def _flatten(table: dict):
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value)
        else:
            yield key, value


def _convert(action: argparse.Action, value, key: str, path: str):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{key} = {value!r} in {path} must be true or false")
        return value
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if action.type is not None and not isinstance(value, bool):
        try:
            value = action.type(value)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{key} = {value!r} in {path} is not a valid --{key.replace('_', '-')}") from exc
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{key} = {value!r} in {path} (choices: {', '.join(map(str, action.choices))})")
    return value


def replay_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The effective option values of a command (file, flags and defaults merged), for ``config.toml``."""
    return {dest: getattr(args, dest) for dest in _optional_actions(parser)
            if dest not in NOT_REPLAYED and getattr(args, dest, None) is not None}


def dump_toml(options: dict, header: str = "") -> str:
    """Flat scalar options as TOML (the only shape ``replay_options`` produces)."""
    lines = [f"# {line}" for line in header.splitlines()]
    for key, value in sorted(options.items()):
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{key.replace('_', '-')} = {text}")
    return "\n".join(lines) + "\n"


def write_options(path: Path, command: str, options: dict) -> None:
    """Write ``config.toml`` so ``transfer <command> --config PATH`` replays the run."""
    header = f"Effective options of this run; replay with: transfer {command} --config {path}"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dump_toml(options, header))
    tmp.replace(path)
