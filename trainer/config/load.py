"""Reading a config: bounded YAML, dotted `key.path=value` overrides, coercion to the dataclasses, and back to
plain dicts and YAML."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from shards.bounded_read import MAX_DEPTH, BoundedReadError, check_depth, read_limited
from trainer.config.checks import ConfigError, show
from trainer.config.schema import Config

MAX_YAML_VALUES = 100_000
"""A config's values counted with YAML aliases expanded: more is refused (an alias bomb under a known key)."""

MAX_CONFIG_BYTES = 1 << 20
"""Bytes of a config file read at most (ours are a few KiB): a larger file is refused before it is parsed."""


def _expanded_size(value: Any, memo: dict[int, int]) -> int:
    """Values in `value` with every shared (aliased) part counted each time it appears; linear in the YAML."""
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) not in memo:
        memo[id(value)] = 0  # a recursive alias counts as nothing more
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        memo[id(value)] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[id(value)]


def _safe_yaml(text: str, source: str) -> Any:
    """yaml.safe_load with one-line errors (line and column) and bounds on alias expansion and nesting."""
    try:
        value = yaml.safe_load(text)
        size = _expanded_size(value, {})
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML{where}: {problem}") from None
    except RecursionError:  # the parser and _expanded_size recurse once per level
        raise ConfigError(f"{source} nests deeper than {MAX_DEPTH} levels") from None
    if size > MAX_YAML_VALUES:
        raise ConfigError(f"{source} expands to more than {MAX_YAML_VALUES} values through YAML aliases")
    try:
        return check_depth(value, source)  # after the size bound: it walks every aliased path
    except BoundedReadError as err:
        raise ConfigError(str(err)) from None


def _read_config(path: Path) -> str:
    """The text of config file `path` (a symlink is followed: the user named it), at most MAX_CONFIG_BYTES."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a YAML file such as configs/demo-cpu.yaml")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = read_limited(path.resolve() if path.is_symlink() else path, MAX_CONFIG_BYTES, "config file")
        return data.decode()
    except BoundedReadError as err:
        raise ConfigError(str(err)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from an optional YAML file and `section.key=value` overrides.

    Raises:
        ConfigError: for a missing or malformed file, an unknown key, a wrong type or an impossible value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        loaded = _safe_yaml(_read_config(path), f"config file {path}")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides:
        _apply_override(data, item)
    return from_dict(Config, data, "")


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.batch_size=8")
    *parents, leaf = key.split(".")
    node = data
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parents[: depth + 1])} is a value, not a section")
        node = child
    node[leaf] = _safe_yaml(raw, f"override {key}") if raw else ""


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, checking keys and types; `prefix` names the section in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys, got {show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown key {path}; valid keys here: {', '.join(fields)}{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = from_dict(kind, value, f"{path}.")
        else:
            kwargs[key] = _coerce(value, kind, path)
    return cls(**kwargs)


def _described(kind: Any) -> str:
    """A type of a config field in words, for an error."""
    if typing.get_origin(kind) is Literal:
        return " or ".join(map(str, typing.get_args(kind)))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, str(kind))


def _coerce(value: Any, kind: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        allowed = typing.get_args(kind)
        if value not in allowed:
            raise ConfigError(f"{path}={show(value)} is not allowed; expected one of: {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        inner = [option for option in options if option is not type(None)]
        errors = []
        for option in inner:  # the first that takes the value
            try:
                return _coerce(value, option, path)
            except ConfigError as err:
                errors.append(err)
        if len(inner) == 1:
            raise errors[0]
        raise ConfigError(f"{path}={show(value)} is not allowed; expected {' or '.join(map(_described, inner))}")
    if origin is list:
        (inner,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{path}={show(value)} has the wrong type; expected a list, e.g. [0, 4]")
        return [_coerce(item, inner, f"{path}[{i}]") for i, item in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "2e-4" (no dot) as a string; accept it for float fields.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{path}={show(value)} is not allowed; expected a finite number")
            return number
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config field type {kind} at {path}")
    raise ConfigError(f"{path}={show(value)} has the wrong type; expected {kind.__name__}")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML, JSON and trackers)."""
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal Config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
