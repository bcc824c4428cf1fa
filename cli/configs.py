"""Settings on the command line: the loader of `contract.settings` with its errors as typer usage
errors, and every setting's help for a command's --help."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import typer
from pydantic import BaseModel

from contract import settings
from contract.settings import Config


def load_config(cls: type[Config], config_file: Path | None, flags: dict, overrides: list[str]) -> Config:
    """`contract.settings.load_config`, its errors as usage errors of the command."""
    try:
        return settings.load_config(cls, config_file, flags, overrides)
    except settings.SettingsError as e:
        raise typer.BadParameter(str(e), param_hint=e.flag) from None


def parse_overrides(overrides: list[str]) -> dict:
    try:
        return settings.parse_overrides(overrides)
    except settings.SettingsError as e:
        raise typer.BadParameter(str(e)) from None


def option(cls: type[BaseModel], field: str, *param_decls: str) -> Any:
    """A flag for setting `field` of `cls`, whose help is the setting's own description: a flag and
    its setting cannot drift apart."""
    setting = cls.model_fields[field]
    help = setting.description or ""
    if get_origin(setting.annotation) is Literal:
        help += f" (one of: {', '.join(map(str, get_args(setting.annotation)))})"
    if not setting.is_required() and setting.get_default() is not None and "default" not in help:
        help += f" (default: {setting.get_default(call_default_factory=True)})"
    return typer.Option(None, *param_decls, help=help, show_default=False)


def config_option(help: str = "YAML file of settings") -> Any:
    return typer.Option(None, "--config", exists=True, dir_okay=False, help=help)


def address_option(help: str = "Ray cluster to run on (default: an embedded local one)") -> Any:
    return typer.Option(None, envvar="RAY_ADDRESS", help=help)


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
