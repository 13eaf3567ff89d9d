"""The one way a mapping (YAML, JSON, command-line overrides) becomes a typed config.

Every config of the package is a dataclass deriving from ``Config``. Building one, from Python or with
``Cls.from_mapping(data)``, checks it once, at the edge:

- an unknown key names itself and lists the known ones (``scaling.workers: unknown option; known: ...``);
- a value of the wrong type names the dotted field and the value (``epochs: must be an integer, got 'x'``);
  an int where a float is declared becomes a float, a list where a tuple is declared a tuple, and one
  value where a list is declared a list of one;
- a bound or a choice declared on the field with ``setting(...)`` is checked the same way
  (``scaling.num_workers: must be an integer >= 1, got 0``);
- a config's own ``check()`` (rules across fields) raises ``ConfigError`` through ``require``.

Nested configs are built from nested mappings, and their errors carry the whole dotted path.
``to_mapping()`` is the inverse (tuples become lists), for JSON files and run records.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, field
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T", bound="Config")


class ConfigError(ValueError):
    """A config value that cannot be used; the message starts with the dotted field name."""


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, minimum: float | None = None,
            maximum: float | None = None, above: float | None = None, below: float | None = None,
            choices: tuple | None = None, repr: bool = True):
    """A dataclass field with bounds: ``minimum``/``maximum`` inclusive, ``above``/``below`` exclusive,
    ``choices`` a tuple of allowed values. ``None`` passes wherever the type admits it."""
    meta = {k: v for k, v in (("minimum", minimum), ("maximum", maximum), ("above", above), ("below", below),
                              ("choices", choices)) if v is not None}
    return field(default=default, default_factory=default_factory, repr=repr, metadata=meta)


def require(ok: bool, name: str, message: str) -> None:
    """For ``check()`` methods: raise ``ConfigError('name: message')`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name}: {message}")


class Config:
    """Base of every config dataclass: checked and normalised when built (``__post_init__``)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = _coerce(_hints(type(self))[f.name], getattr(self, f.name), f.name)
            _check_bounds(f, value, f.name)
            object.__setattr__(self, f.name, value)        # frozen configs too
        self.check()

    def check(self) -> None:
        """Rules across fields; override and raise through ``require``."""

    @classmethod
    def from_mapping(cls: type[T], data: Any, where: str = "") -> T:
        """``cls`` built from ``data``; ``where`` is the dotted prefix of its place in a larger config."""
        return from_mapping(cls, data, where)

    def to_mapping(self) -> dict:
        return to_mapping(self)


def from_mapping(cls: type[T], data: Any, where: str = "") -> T:
    """The config ``cls`` built from the mapping ``data`` (see the module's docstring)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown option; known: {', '.join(sorted(fields))}")
    missing = [n for n, f in fields.items() if n not in data and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{where}{missing[0]}: required")
    try:
        return cls(**data)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def to_mapping(obj: Any) -> Any:
    """A config (or a value inside one) as plain JSON-ready data: tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj


# --- types ----------------------------------------------------------------------------------------------

@cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _coerce(hint, value, where: str):
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        if value is None:
            if len(options) < len(typing.get_args(hint)):
                return None
            raise ConfigError(f"{where}: must be {_describe(hint)}, got None")
        for option in options:
            try:
                return _coerce(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: must be {_describe(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, f"{where}.")
    if origin in (list, tuple):
        args = typing.get_args(hint)
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        if not isinstance(value, (list, tuple)):
            if fixed or isinstance(value, dict):
                raise ConfigError(f"{where}: must be a list, got {value!r}")
            value = [value]          # one value where a list is expected: a list of one (`input: a.tar`)
        if fixed:
            if len(value) != len(args):
                raise ConfigError(f"{where}: must be a list of {len(args)} values, got {value!r}")
            items = [_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item = args[0] if args else Any
            items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: must be {_describe(hint)}, got {value!r}")


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_describe(o) for o in typing.get_args(hint) if o is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in typing.get_args(hint) else "")
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    return _KIND.get(hint, getattr(hint, "__name__", str(hint)))


def _check_bounds(f: dataclasses.Field, value, where: str) -> None:
    meta = f.metadata
    if value is None or not meta:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    kind = "an integer" if isinstance(value, int) else "a number"
    if "minimum" in meta and value < meta["minimum"]:
        raise ConfigError(f"{where}: must be {kind} >= {meta['minimum']}, got {value!r}")
    if "above" in meta and value <= meta["above"]:
        raise ConfigError(f"{where}: must be {kind} > {meta['above']}, got {value!r}")
    if "maximum" in meta and value > meta["maximum"]:
        raise ConfigError(f"{where}: must be {kind} <= {meta['maximum']}, got {value!r}")
    if "below" in meta and value >= meta["below"]:
        raise ConfigError(f"{where}: must be {kind} < {meta['below']}, got {value!r}")
