"""Typed configs from YAML files, command-line flags and `key=value` overrides, in that order.

Errors name the setting and say what was wrong with it, never a pydantic traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import typer
import yaml
from pydantic import BaseModel, ValidationError

Config = TypeVar("Config", bound=BaseModel)


def parse_overrides(overrides: list[str]) -> dict:
    """['a.b=1', 'c=[x, y]'] -> {'a': {'b': 1}, 'c': ['x', 'y']}; values are read as YAML."""
    result: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not key=value (e.g. test_size=200)")
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value) if value != "" else ""
    return result


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_config(cls: type[Config], config_file: Path | None, flags: dict, overrides: list[str]) -> Config:
    """Build `cls` from a YAML file, then flags (those not None), then `key=value` overrides."""
    values: dict = {}
    if config_file is not None:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise typer.BadParameter(f"{config_file} must hold a mapping of settings", param_hint="--config")
        values = loaded
    values = _merge(values, {k: v for k, v in flags.items() if v is not None})
    values = _merge(values, parse_overrides(overrides))
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(config)"
            got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
            problems.append(f"setting '{field}': {err['msg']}{got}")
        raise typer.BadParameter("\n".join(problems)) from None


def settings_help(cls: type[BaseModel]) -> str:
    """Every setting of `cls`, its default and its meaning, for a command's --help; nested
    settings as `outer.inner`, as they are written on the command line."""
    return "\n\n".join(["Settings (YAML via --config, or key=value arguments):", "", *_setting_lines(cls, "")])


def _setting_lines(cls: type[BaseModel], prefix: str) -> list[str]:
    lines = []
    for name, field in cls.model_fields.items():
        nested = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        if nested and not field.is_required():
            lines += _setting_lines(nested, f"{prefix}{name}.")
            continue
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        lines.append(f"  {prefix}{name} = {default}: {field.description}")
    return lines
