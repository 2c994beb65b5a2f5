"""Options in one place: flags built from the config dataclasses, TOML read and written here, every value type-checked.

Two TOML shapes, one reader (:func:`read_toml`) and one writer (:func:`dump_toml`):

* ``--config FILE`` of every command (:func:`load_options`): keys are the command's long option names
  (``image-size`` or ``image_size``), at the top level or in any table (``[model]``, ``[train]``... only group them);
  flags given on the command line win. A run's ``config.toml`` is such a file (:func:`write_options`).
* structured configs of ``compare`` and ``pipeline`` (:func:`read_config`): top-level keys and tables whose keys are
  the fields of a config dataclass (``[data]`` -> DataConfig, ``[[matrix]]`` -> MatrixConfig, ...), registered as
  :class:`Table` rows by the command that reads them.

A value of the wrong type (a float or a bool where an integer belongs, a string where a list belongs) is a one-line
:class:`UserError`, never a silent conversion. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import tomllib

from transfer.errors import UserError, closest, unknown

CONFIG_DEST = "config_file"
# Not replayed: where the options came from, and the one flag that would destroy the run being replayed.
NOT_REPLAYED = {CONFIG_DEST, "func", "command", "overwrite"}

_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


# ---------------------------------------------------------------------------------------------- types


def _alternatives(annotation) -> tuple:
    """``int | None`` -> (int, NoneType); ``list[int]`` -> (list[int],)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _type_text(annotation) -> str:
    parts = []
    for alt in _alternatives(annotation):
        if alt is type(None):
            continue
        if typing.get_origin(alt) in (list, tuple):
            parts.append(f"a list of {_type_text(typing.get_args(alt)[0]).removeprefix('a ').removeprefix('an ')}s")
        else:
            parts.append(_KIND_NAMES.get(alt, getattr(alt, "__name__", str(alt))))
    return " or ".join(parts)


def _accepts(annotation, value):
    """``(True, converted)`` when ``value`` fits ``annotation`` strictly (no bool for int, no float for int), else
    ``(False, None)``; an int for a float field becomes a float."""
    for alt in _alternatives(annotation):
        if alt is type(None) and value is None:
            return True, None
        if alt is bool and isinstance(value, bool):
            return True, value
        if isinstance(value, bool):
            continue
        if alt is int and isinstance(value, int):
            return True, value
        if alt is float and isinstance(value, int | float):
            return True, float(value)
        if alt is str and isinstance(value, str):
            return True, value
        if typing.get_origin(alt) in (list, tuple) and isinstance(value, list | tuple):
            (inner,) = typing.get_args(alt)[:1]
            converted = []
            for item in value:
                ok, item = _accepts(inner, item)
                if not ok:
                    break
                converted.append(item)
            else:
                return True, converted
    return False, None


def check_value(key: str, value, annotation, where: str):
    """``value`` converted to ``annotation``'s type, or a one-line UserError naming ``key`` and ``where``."""
    ok, converted = _accepts(annotation, value)
    if not ok:
        raise UserError(f"{key} = {value!r} in {where} must be {_type_text(annotation)}")
    return converted


def field_types(cls) -> dict[str, object]:
    """The evaluated annotations of a config dataclass."""
    import transfer.config  # noqa: F401  (names the annotations refer to)

    return typing.get_type_hints(cls)


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that a flag (and a TOML key) sets."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def flag_of(f: dataclasses.Field) -> str:
    """``--image-size`` for field ``image_size`` (or the field's own ``flag`` name)."""
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def dest_of(f: dataclasses.Field) -> str:
    return flag_of(f)[2:].replace("-", "_")


# ---------------------------------------------------------------------------------------------- flags


def _on_off(text: str) -> bool:
    if text.lower() in ("on", "true", "yes", "1"):
        return True
    if text.lower() in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"'{text}' is not on or off")


def comma_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (the one comma-split of list-valued flags)."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _list_of(kind, flag: str):
    """An argparse type for a comma-separated list of ``kind`` (whole numbers checked with isdecimal)."""

    def parse(text: str) -> list:
        items = comma_list(text)
        if kind is int:
            for item in items:
                if not item.isdecimal():
                    raise argparse.ArgumentTypeError(f"'{item}' is not a whole number")
            return [int(item) for item in items]
        return items

    parse.__name__ = f"{flag} list"
    return parse


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def add_config_args(group, cls, *, exclude: tuple[str, ...] = (), unset: bool = False,
                    default_texts: dict[str, str] | None = None) -> None:
    """One flag per CLI field of ``cls``: type, choices and help from the field, the default shown in ``--help``.

    ``unset`` leaves every default None, so a command can tell which flags were given (compare layers flags over a
    config file; baseline fills unset flags from its protocol); ``default_texts`` then says where the default comes
    from.
    """
    hints = field_types(cls)
    for f in cli_fields(cls):
        if f.name in exclude:
            continue
        kinds = [k for k in _alternatives(hints[f.name]) if k is not type(None)]
        kind = kinds[0]
        text = (default_texts or {}).get(f.name) or f.metadata.get("default_text") or _shown(f.default)
        kwargs: dict = {"dest": dest_of(f), "help": f"{f.metadata.get('help', '')} (default: {text})",
                        "default": None if unset else f.default}
        if kind is bool and len(_alternatives(hints[f.name])) == 1:
            kwargs["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
        elif kind is bool:
            kwargs.update(type=_on_off, metavar="on|off")
        elif typing.get_origin(kind) in (list, tuple):
            inner = typing.get_args(kind)[0]
            kwargs.update(type=_list_of(inner if inner in (int, str) else str, flag_of(f)), metavar="A,B,...")
        else:
            kwargs["type"] = kind
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        group.add_argument(flag_of(f), **kwargs)


def given(args: argparse.Namespace, cls) -> dict:
    """The values of ``cls``'s fields that ``args`` holds (None: not given), keyed by field name."""
    out = {}
    for f in cli_fields(cls):
        value = getattr(args, dest_of(f), None)
        if value is not None:
            out[f.name] = value
    return out


def build(cls, values: dict, where: str = "the options", base=None):
    """``cls`` from ``values`` (field name -> value) over ``base`` (default: the field defaults), type-checked."""
    hints = field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in values.items():
        if key not in known:
            raise unknown(f"key in {where}", key, [f.name for f in cli_fields(cls)])
        checked[key] = check_value(key, value, hints[key], where)
    return dataclasses.replace(base, **checked) if base is not None else cls(**checked)


# ---------------------------------------------------------------------------------------------- TOML


def read_toml(path: str | os.PathLike, flag: str = "--config") -> dict:
    """A TOML file as a dict; a missing or malformed file is a one-line UserError."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise UserError(f"{flag} '{path}' does not exist; pass a TOML file") from exc
    except IsADirectoryError as exc:
        raise UserError(f"{flag} '{path}' is a directory; pass a TOML file") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{flag} '{path}' is not valid TOML ({exc})") from exc


def _toml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")


def dump_toml(data: dict, header: str = "") -> str:
    """``data`` as TOML: scalars and lists first, then ``[tables]`` and ``[[arrays of tables]]`` (one level)."""
    lines = [f"# {line}" for line in header.splitlines()]
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}
    for key, value in data.items():
        if key not in tables and key not in arrays and value is not None:
            lines.append(f"{key} = {_toml_scalar(value)}")
    for key, table in tables.items():
        lines += ["", f"[{key}]", *(f"{k} = {_toml_scalar(v)}" for k, v in table.items() if v is not None)]
    for key, items in arrays.items():
        for table in items:
            lines += ["", f"[[{key}]]", *(f"{k} = {_toml_scalar(v)}" for k, v in table.items() if v is not None)]
    return "\n".join(lines) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)  # open() applies the umask itself
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- per-command files


def _optional_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}


def _flatten(table: dict):
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value)
        else:
            yield key, value


def _action_for(key: str, actions: dict[str, argparse.Action]) -> tuple[argparse.Action, bool] | None:
    """The action a file key sets, and whether the key is a ``no-`` negation of a boolean flag."""
    flag = "--" + key.replace("_", "-")
    for action in actions.values():
        if flag in action.option_strings:
            negated = isinstance(action, argparse.BooleanOptionalAction) and flag.startswith("--no-")
            return action, negated
    return None


def _convert(action: argparse.Action, value, key: str, path: str, negated: bool):
    flag = action.option_strings[0]
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise UserError(f"{key} = {value!r} in {path} must be true or false")
        if isinstance(action, argparse._StoreFalseAction):
            return not value
        return not value if negated else value
    if isinstance(value, bool):
        raise UserError(f"{key} = {value!r} in {path} is not a valid {flag} value")
    if action.type is int and not isinstance(value, int):
        raise UserError(f"{key} = {value!r} in {path} must be an integer")
    if action.type is float and not isinstance(value, int | float):
        raise UserError(f"{key} = {value!r} in {path} must be a number")
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if action.type is not None:
        try:
            value = action.type(value if action.type in (int, float) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise UserError(f"{key} = {value!r} in {path} is not a valid {flag} ({exc})") from exc
    elif not isinstance(value, str):
        raise UserError(f"{key} = {value!r} in {path} must be a string")
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{key} = {value!r} in {path} (choices: {', '.join(map(str, action.choices))})")
    return value


def load_options(path: str, parser: argparse.ArgumentParser) -> dict:
    """Option values from a TOML file, checked against ``parser``'s options and converted to their types."""
    table = read_toml(path)
    actions = {d: a for d, a in _optional_actions(parser).items() if d not in NOT_REPLAYED}
    values = {}
    for key, value in _flatten(table):
        found = _action_for(key, actions)
        if found is None:
            names = sorted({s[2:] for a in actions.values() for s in a.option_strings if s.startswith("--")})
            raise unknown(f"option in {path}", key, names)
        action, negated = found
        values[action.dest] = _convert(action, value, key, path, negated)
    return values


def replay_options(*configs, extra: dict | None = None) -> dict:
    """The effective option values of a run, by flag name, from its resolved config objects (for ``config.toml``)."""
    out = {}
    for config in configs:
        for f in cli_fields(type(config)):
            value = getattr(config, f.name)
            if value is not None and dest_of(f) not in NOT_REPLAYED:
                out[dest_of(f)] = list(value) if isinstance(value, tuple) else value
    out.update(extra or {})
    return out


def write_options(path: Path, command: str, options: dict) -> None:
    """Write ``config.toml`` so ``transfer <command> --config PATH`` replays the run."""
    header = f"Effective options of this run; replay with: transfer {command} --config {path}"
    flat = {key.replace("_", "-"): value for key, value in sorted(options.items())}
    write_text_atomic(path, dump_toml(flat, header))


# ---------------------------------------------------------------------------------------------- structured configs


@dataclass(frozen=True)
class Table:
    """A registered table of a structured config: ``[name]`` (or ``[[name]]`` with ``array``) holding ``cls``'s
    CLI fields; ``exclude`` lists fields the table does not take."""

    name: str
    cls: type
    array: bool = False
    exclude: tuple[str, ...] = ()


def _check_table(table: dict, cls, exclude: tuple[str, ...], where: str, path: str) -> dict:
    hints = field_types(cls)
    allowed = {f.name for f in cli_fields(cls) if f.name not in exclude}
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in allowed:
            guess = closest(name, allowed)
            hint = f"; did you mean '{where}{guess}'?" if guess else ""
            raise UserError(f"unknown config key '{where}{key}' in {path}{hint} "
                            f"(valid: {', '.join(where + a for a in sorted(allowed))})")
        out[name] = check_value(f"{where}{key}", value, hints[name], path)
    return out


def read_config(path: str | os.PathLike, top, tables: tuple[Table, ...], flag: str = "--config") -> dict:
    """A structured TOML file, every key and type checked: ``{"top": {...}, table name: {...} or [{...}, ...]}``.

    ``top`` is the dataclass of the top-level keys; tables not in the file are empty (``{}`` or ``[]``).
    """
    path = str(path)
    data = read_toml(path, flag)
    by_name = {t.name: t for t in tables}
    top_values = {k: v for k, v in data.items() if k not in by_name}
    out = {"top": _check_table(top_values, top, (), "", path)}
    for t in tables:
        value = data.get(t.name, [] if t.array else {})
        if t.array:
            value = [value] if isinstance(value, dict) else value
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise UserError(f"config '{t.name}' in {path} must be a [{t.name}] table or [[{t.name}]] tables")
            out[t.name] = [_check_table(v, t.cls, t.exclude, f"{t.name}[{i}].", path) for i, v in enumerate(value)]
        else:
            if not isinstance(value, dict):
                raise UserError(f"config '{t.name}' in {path} must be a [{t.name}] table")
            out[t.name] = _check_table(value, t.cls, t.exclude, f"{t.name}.", path)
    return out


# ---------------------------------------------------------------------------------------------- shared flag groups


def add_data_args(parser: argparse.ArgumentParser, *, unset: bool = False, default_texts: dict | None = None) -> None:
    """The data and augmentation flags (DataConfig, AugmentConfig) every training command shares."""
    from transfer.config import AugmentConfig, DataConfig

    add_config_args(parser.add_argument_group("data"), DataConfig, unset=unset, default_texts=default_texts)
    add_config_args(parser.add_argument_group("augmentation (training split only)"), AugmentConfig, unset=unset,
                    default_texts=default_texts)


def add_train_args(parser: argparse.ArgumentParser, *, unset: bool = False, default_texts: dict | None = None) -> None:
    """The training flags (TrainConfig)."""
    from transfer.config import TrainConfig

    add_config_args(parser.add_argument_group("training"), TrainConfig, unset=unset, default_texts=default_texts)


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The run-directory flags (RunConfig)."""
    from transfer.config import RunConfig

    add_config_args(parser.add_argument_group("run directory"), RunConfig)


def shared_configs(args: argparse.Namespace, *, augment=None, train=None):
    """DataConfig, AugmentConfig, TrainConfig and RunConfig from the flags every training command shares, each over
    its ``base`` (``augment``/``train``: a protocol's values; default: the dataclass defaults). The data split uses
    the training seed."""
    from transfer.config import AugmentConfig, DataConfig, RunConfig, TrainConfig

    train_cfg = build(TrainConfig, given(args, TrainConfig), "the training options", base=train)
    data = build(DataConfig, {**given(args, DataConfig), "seed": train_cfg.seed}, "the data options")
    augment_cfg = build(AugmentConfig, given(args, AugmentConfig), "the augmentation options", base=augment)
    augment_cfg.resolved()  # validate before any work
    run = build(RunConfig, {**given(args, RunConfig), "command": getattr(args, "command", "") or ""},
                "the run options")
    return data, augment_cfg, train_cfg, run
