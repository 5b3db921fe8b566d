"""Plain YAML values -> the typed, frozen config dataclasses: types, bounds, dotted overrides."""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import yaml

from jaxtl.bounds import Bounds, field_bounds
from jaxtl.errors import JaxtlError
from jaxtl.optim.settings import Labels, describe_freezing


class ConfigError(JaxtlError, ValueError):
    """A config file, key or value that cannot be used."""


def to_plain(value: Any) -> Any:
    """A config value as plain YAML values: dataclasses as dicts, tuples as lists, a Python freezing by its name."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: to_plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    if isinstance(value, Labels) or callable(value):
        return describe_freezing(value)
    return value


# Bounds on what a config may hold: YAML aliases can make a list that holds itself, or a few lines
# that expand to billions of values ("billion laughs"); a real config is a few dozen values, 4 levels deep.
MAX_VALUES = 100_000
MAX_DEPTH = 32


def copy_plain(value: Any, source: str = "config") -> Any:
    """Mappings as dicts and sequences as lists, copied; ConfigError past MAX_VALUES values or MAX_DEPTH levels."""
    count = 0

    def copy(value: Any, depth: int) -> Any:
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(
                f"{source}: more than {MAX_VALUES} values (YAML aliases that expand?); a run config is far smaller"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"{source}: nested too deeply (more than {MAX_DEPTH} levels; a YAML alias inside itself?)"
            )
        if isinstance(value, Mapping):
            return {k: copy(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [copy(v, depth + 1) for v in value]
        return value

    return copy(value, 0)


def _show_key(key: Any) -> str:
    """A key as written in an error message: plain if it prints on one line, its repr otherwise."""
    return key if isinstance(key, str) and key.isprintable() and key.strip() == key and key else repr(key)


def describe_yaml_error(error: Exception) -> str:
    """A YAML parser error on one line: what, and where."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    text = ", ".join(str(part) for part in parts if part) or str(error)
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        text += f" at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(text.split())


def _same_kind(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is the kind of thing ``annotation`` holds (a list for a tuple, a string for a Literal)."""
    origin = typing.get_origin(annotation) or annotation
    if isinstance(value, (list, tuple)):
        return origin in (tuple, list, Sequence)
    if isinstance(value, str):
        return origin in (Literal, str)
    if isinstance(value, Mapping):
        return dataclasses.is_dataclass(annotation) or origin in (dict, Mapping)
    return False


def _convert(value: Any, annotation: Any, key: str, source: str, bounds: Bounds | None = None) -> Any:
    """``value`` checked against (and converted to) ``annotation``; ConfigError naming ``key`` otherwise.

    ``bounds`` apply to the numbers in ``value``. Values only Python can give (a rules function, a
    :class:`jaxtl.optim.Labels`, a Rule) are taken where the annotation allows them.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    where = f"{source}: {key}"
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where} must be a mapping of {', '.join(f.name for f in dataclasses.fields(annotation))}"
            )
        return build_dataclass(annotation, value, key, source)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where} must not be null")
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key, source, bounds)
            except ConfigError as error:
                errors.append((_same_kind(value, option), error))
        raise next((error for same, error in errors if same), errors[0][1])  # the option the value was meant for
    if origin is collections.abc.Callable:
        if not callable(value) or isinstance(value, type):
            raise ConfigError(f"{where} must be a function, got {value!r}")
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} is {value!r}; expected one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list, Sequence) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}.{i}", source, bounds) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return tuple(_convert(v, item, f"{key}.{i}", source, bounds) for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__} {value!r}")
        key_type, value_type = args or (str, Any)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where} has a non-string key {k!r}; quote it")
            out[k] = _convert(v, value_type, f"{key}.{k}", source, bounds)
        return out
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return _check_bounds(value, bounds, where)
    if annotation is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            digits = str(value)
            raise ConfigError(f"{where} must be a finite number, got {digits[:6]}... ({len(digits)} digits)") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where} must be finite, got {value}")
        return _check_bounds(value, bounds, where)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(annotation, type):  # a Python-only type, e.g. jaxtl.optim.Labels
        if not isinstance(value, annotation):
            raise ConfigError(f"{where} must be a {annotation.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {annotation}")


def _check_bounds(value: float, bounds: Bounds | None, where: str) -> float:
    if bounds is not None and not bounds.contains(value):
        raise ConfigError(f"{where} = {value} is out of range {bounds.describe()}")
    return value


def build_dataclass(cls: type, data: Mapping, prefix: str, source: str):
    """``cls`` from the plain mapping ``data`` found under the dotted ``prefix``: unknown keys, wrong types and
    out-of-range values are ConfigErrors naming ``source`` and the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(where + _show_key(k) for k in unknown)}; "
            f"known under {prefix or 'the top level'}: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            values[name] = _convert(data[name], hints[name], key, source, field_bounds(field))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {key} is required")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: {prefix or 'config'}: {error}") from None


def set_dotted(data: dict, key: str, value: Any, source: str) -> None:
    """Sets the dotted ``key`` (``phases.0.epochs``) of the plain ``data`` in place, making missing mappings."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: {here}: no item {part} (the list has {len(node)})")
            node = node[int(part)]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {here} is not a mapping")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{source}: {key}: no item {last} (the list has {len(node)})")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{source}: {'.'.join(parts[:-1])} is not a mapping")


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=3e-4", "phases.0.epochs=1"]`` -> [(key, YAML-parsed value)]."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not key.isprintable():
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr=3e-4)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except (yaml.YAMLError, RecursionError) as error:
            problem = describe_yaml_error(error)
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
        parsed.append((key.strip(), value))
    return parsed
