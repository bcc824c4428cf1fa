"""Typed settings from a YAML file, flags and `key=value` overrides, in that order: one loader for
the command line, `serve build`'s environment and anything else that reads settings.

Errors name the setting and say what was wrong with it, never a pydantic traceback. They are
`SettingsError`s, which the CLI turns into usage errors and everything else shows as it would any
other UserError.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from contract.errors import UserError

Config = TypeVar("Config", bound=BaseModel)


class SettingsError(UserError):
    """A bad settings file or value. `flag` names the command-line flag to blame, where one is."""

    def __init__(self, message: str, flag: str | None = None):
        super().__init__(message)
        self.flag = flag


def parse_overrides(overrides: list[str]) -> dict:
    """['a.b=1', 'c=[x, y]'] -> {'a': {'b': 1}, 'c': ['x', 'y']}; values are read as YAML."""
    result: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SettingsError(f"{item!r} is not key=value (e.g. test_size=200)")
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value) if value != "" else ""
    return result


def merge(base: dict, update: dict) -> dict:
    """`update` over `base`, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_config(
    cls: type[Config], config_file: Path | None = None, flags: dict | None = None, overrides: list[str] = ()
) -> Config:
    """Build `cls` from a YAML file, then flags (those not None), then `key=value` overrides."""
    values: dict = {}
    if config_file is not None:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise SettingsError(f"{config_file} must hold a mapping of settings", flag="--config")
        values = loaded
    values = merge(values, {k: v for k, v in (flags or {}).items() if v is not None})
    values = merge(values, parse_overrides(list(overrides)))
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(config)"
            got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
            problems.append(f"setting '{field}': {err['msg']}{got}")
        raise SettingsError("\n".join(problems)) from None
