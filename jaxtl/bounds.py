"""Bounds of numeric settings, declared next to their dataclass fields and checked in one place.

    lr: float = bounded(1e-3, low=0)
    betas: tuple[float, float] = bounded((0.9, 0.999), low=0, high=1, open_high=True)

A bound applies to a number, to each item of a tuple and to each value of a mapping; None is not
checked. The run config's parser checks bounds as it reads each key (its errors name the dotted key
and the file), and the dataclasses check them again when built from Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A closed interval ``[low, high]``, or ``[low, high)`` with ``open_high``; None is unbounded."""

    low: float | None = None
    high: float | None = None
    open_high: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and value < self.low:
            return False
        if self.high is not None and (value >= self.high if self.open_high else value > self.high):
            return False
        return True

    def describe(self) -> str:
        low = "-inf" if self.low is None else self.low
        high = "inf" if self.high is None else self.high
        return f"[{low}, {high}{')' if self.open_high else ']'}"


def bounded(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
            open_high: bool = False, **field_kwargs) -> Any:  # fmt: skip
    """A dataclass field whose numbers must lie within ``[low, high]`` (``[low, high)`` with ``open_high``)."""
    metadata = {"bounds": Bounds(low, high, open_high)}
    return dataclasses.field(default=default, metadata=metadata, **field_kwargs)


def field_bounds(field: dataclasses.Field) -> Bounds | None:
    return field.metadata.get("bounds")


def numbers(value: Any, key: str) -> Iterator[tuple[str, float]]:
    """``(dotted key, number)`` for a number, each item of a sequence and each value of a mapping."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        yield key, value
    elif isinstance(value, Mapping):
        for name, item in value.items():
            yield from numbers(item, f"{key}.{name}")
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from numbers(item, f"{key}.{index}")


def out_of_bounds(instance: Any, prefix: str = "") -> str | None:
    """The first field value of a dataclass ``instance`` outside its bounds, described; None if all lie within."""
    for field in dataclasses.fields(instance):
        bounds = field_bounds(field)
        if bounds is None:
            continue
        for key, number in numbers(getattr(instance, field.name), prefix + field.name):
            if not bounds.contains(number):
                return f"{key} = {number} is out of range {bounds.describe()}"
    return None
