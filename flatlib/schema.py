"""A declarative schema for nested parameter dicts (``flatlib.profiles``): field types that check a value
and raise a ValueError naming it by its path (``"pretraining.steps.hmm: expected an integer >= 1, got 0"``).
A ``Dict`` of fields is checked by ``Dict(...).check(name, value)``, which walks it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flatlib.checks import check_int, check_number, check_seed


@dataclass(frozen=True)
class Int:
    low: int = 1

    def check(self, name: str, value: Any) -> None:
        check_int(name, value, self.low)


@dataclass(frozen=True)
class Seed:
    def check(self, name: str, value: Any) -> None:
        check_seed(name, value)


@dataclass(frozen=True)
class Number:
    """A real number in (low, high), or in [low, high) if ``closed``."""
    low: float = 0.0
    high: float = math.inf
    closed: bool = False

    def check(self, name: str, value: Any) -> None:
        if not self.closed:
            check_number(name, value, self.low, self.high)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not self.low <= value < self.high:
            raise ValueError(f"{name}: expected a number in [{self.low}, {self.high}), got {value!r}")


@dataclass(frozen=True)
class Str:
    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")


@dataclass(frozen=True)
class OneOf:
    choices: tuple

    def check(self, name: str, value: Any) -> None:
        if value not in self.choices:
            raise ValueError(f"{name}: expected one of {self.choices}, got {value!r}")


@dataclass(frozen=True)
class ListOf:
    """A list or tuple of at least ``min_len`` items, each checked by ``item`` under the list's name."""
    item: Any
    min_len: int = 1
    increasing: bool = False  # strictly
    distinct: bool = False

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, (list, tuple)) or len(value) < self.min_len:
            raise ValueError(f"{name}: expected a list of length >= {self.min_len}, got {value!r}")
        for item in value:
            self.item.check(name, item)
        if self.increasing and list(value) != sorted(set(value)):
            raise ValueError(f"{name}: expected increasing values, got {value!r}")
        if self.distinct and len(set(value)) != len(value):
            raise ValueError(f"{name}: expected distinct values, got {value!r}")


@dataclass(frozen=True)
class Pair:
    """A list or tuple of two items, checked by ``first`` and ``second`` under the pair's name."""
    first: Any
    second: Any

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"{name}: expected a pair, got {value!r}")
        self.first.check(name, value[0])
        self.second.check(name, value[1])


@dataclass(frozen=True)
class MapOf:
    """``{key: value}`` with keys among ``keys`` (any may be absent); each value checked as ``name.key``."""
    keys: tuple
    value: Any

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, dict) or not set(value) <= set(self.keys):
            raise ValueError(f"{name}: expected a dict with keys among {self.keys}, got {value!r}")
        for key, item in value.items():
            self.value.check(f"{name}.{key}", item)


@dataclass(frozen=True)
class Kwargs:
    """The keyword arguments of a function that checks them itself (a language generator)."""
    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a dict of keyword arguments, got {value!r}")


@dataclass(frozen=True)
class Opt:
    """A key of a ``Dict`` that may be absent."""
    field: Any

    def check(self, name: str, value: Any) -> None:
        self.field.check(name, value)


@dataclass(frozen=True, init=False)
class Dict:
    """A dict with exactly these keys (those wrapped in ``Opt`` may be absent), each checked as ``name.key``
    (as ``key`` where ``name`` is empty: the top level)."""
    fields: dict

    def __init__(self, **fields: Any) -> None:
        object.__setattr__(self, "fields", fields)

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a dict with the keys {sorted(self.fields)}, got {value!r}")
        required = {key for key, field in self.fields.items() if not isinstance(field, Opt)}
        unknown, missing = set(value) - set(self.fields), required - set(value)
        if unknown or missing:
            raise ValueError(f"{name}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        for key, item in value.items():
            self.fields[key].check(f"{name}.{key}" if name else key, item)
