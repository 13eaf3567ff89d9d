"""The one loader of configs from YAML: a file (local or any store) or a mapping, with overrides on top,
built into a typed config (``core.config``) whose errors name the file and the dotted field."""

from __future__ import annotations

from typing import Any, TypeVar

from perceptclip.core.config import Config, ConfigError
from perceptclip.core.storage import filesystem

T = TypeVar("T", bound=Config)


def read_yaml(path: str, options: dict | None = None) -> Any:
    """The YAML document at ``path`` (a local path or any fsspec URL)."""
    import yaml

    fs, where = filesystem(path, options)
    with fs.open(where, "r", encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_config(cls: type[T], path: str | None = None, overrides: dict | None = None) -> T:
    """``cls`` from the YAML mapping in ``path`` (if any) with ``overrides`` (those not None) on top. The
    file alone is checked first, so its own mistakes name the file."""
    data: dict = {}
    if path:
        loaded = read_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config is a mapping of options")
        try:
            cls.from_mapping(loaded)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
        data = dict(loaded)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return cls.from_mapping(data)
