"""Pipeline stages to and from TOML tables: checking every key and value against the
stage's dataclass fields, and writing the small subset of TOML that pipelines use."""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import fields
from typing import Any, Union

from .errors import ConfigError


def stage_from_table(cls, section: str, table: dict, *, skip=("kind",)):
    """An instance of the dataclass ``cls`` from a TOML table; unknown keys and
    wrongly typed values raise ``ConfigError`` naming the key and what is valid."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    values = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key not in names:
            kind = f" for kind {table['kind']!r}" if "kind" in table else ""
            raise ConfigError(f"{section} key {key!r} is not known{kind}; valid keys: {', '.join([*skip, *names])}")
        if not matches(value, hints[key]):
            raise ConfigError(f"{section} {key} = {value!r} is not valid; use {describe(hints[key])}")
        values[key] = float(value) if hints[key] is float else value
    return cls(**values)


def stage_to_table(stage) -> dict:
    """The TOML table of a stage: its ``kind`` first if it has one, then every field
    that is not None (None is every optional field's default, and TOML has no null)."""
    table = {"kind": stage.kind} if hasattr(type(stage), "kind") else {}
    for f in fields(stage):
        value = getattr(stage, f.name)
        if value is not None:
            table[f.name] = value
    return table


def pick(registry: dict, section: str, table: dict):
    """The class ``table['kind']`` names in ``registry``."""
    if not isinstance(table, dict):
        raise ConfigError(f"{section} must be a table, got {table!r}; write it as [{section.strip('[]')}] with keys below")
    kind = table.get("kind")
    if kind not in registry:
        raise ConfigError(f"{section} kind = {kind!r} is not known; use one of: {', '.join(registry)}")
    return registry[kind]


def dumps(document: dict) -> str:
    """``document`` as TOML: scalars and lists of scalars, tables, arrays of tables."""
    lines: list[str] = []
    _dump_table(document, [], lines)
    return "\n".join(lines).strip() + "\n"


def _dump_table(table: dict, path: list[str], lines: list[str]) -> None:
    def is_array_of_tables(v):
        return isinstance(v, list) and bool(v) and all(isinstance(i, dict) for i in v)

    # A table's own keys must come before its first sub-table header.
    for key, value in table.items():
        if not isinstance(value, dict) and not is_array_of_tables(value):
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        header = ".".join(map(_key, [*path, key]))
        if isinstance(value, dict):
            lines += ["", f"[{header}]"]
            _dump_table(value, [*path, key], lines)
        elif is_array_of_tables(value):
            for item in value:
                lines += ["", f"[[{header}]]"]
                _dump_table(item, [*path, key], lines)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # repr gives the shortest round-tripping form; TOML spells inf/nan the same.
        text = repr(value)
        return text if any(c in text for c in ".eni") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise ConfigError(f"{value!r} ({type(value).__name__}) cannot be written to TOML; use a number, string, boolean or list")


def matches(value, hint) -> bool:
    """Whether a TOML value fits the type hint (``int``, ``float``, ``str | None``, ``list[str]``...)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def describe(hint) -> str:
    """The hint in words for an error message: "an integer", "a list of strings"."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return f"a list of {describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if typing.get_origin(hint) is dict:
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
