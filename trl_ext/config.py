"""Typed YAML presets for the TRL entry points, through the project's one config loader (`--set a.b=value` overrides)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel

from reward_plugins.config_loader import ConfigError, expand_path, load_model

__all__ = ["CPU_DEFAULTS", "ConfigError", "ExistingPath", "existing", "load_config", "split_overrides", "unknown_fields"]

M = TypeVar("M", bound=BaseModel)


def load_config(model: type[M], path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> M:
    """Read a YAML preset (or start empty), apply overrides, validate into `model`; errors name file, line and key.

    The error title names the kind of file from the model's `CONFIG_KIND` ("train", "SFT", "RM")."""
    return load_model(model, path, overrides, kind=getattr(model, "CONFIG_KIND", model.__name__))


def existing(value: str | None) -> str | None:
    """Expand `${VAR:-default}` and `~` in a path and check that it exists."""
    if value is None:
        return None
    expanded = expand_path(value)
    if not Path(expanded).exists():
        raise ValueError(f"path does not exist: {expanded}")
    return expanded


ExistingPath = Annotated[str, AfterValidator(existing)]
"""A path that must exist at load time (`${VAR:-default}` and `~` expanded)."""

CPU_DEFAULTS: dict[str, Any] = {"use_cpu": True, "bf16": False, "fp16": False}


def unknown_fields(config_cls: type, values: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """(key path, message) for each key of `values` that is not a field of the dataclass `config_cls`."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    return [(("trl", key), f"unknown {config_cls.__name__} field") for key in sorted(set(values) - known)]


def split_overrides(extra: Sequence[str]) -> list[str]:
    """Turn dotted flags (`--trl.learning_rate=1e-5`, `--trl.max_steps 5`) into `key=value` overrides."""
    overrides, items = [], list(extra)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--"):
            raise ConfigError([f"unexpected argument {flag!r}; use --key=value or --set key=value"], "train")
        key = flag[2:]
        if "=" in key:
            overrides.append(key)
        elif items and not items[0].startswith("--"):
            overrides.append(f"{key}={items.pop(0)}")
        else:
            raise ConfigError([f"{flag}: missing value"], "train")
    return overrides
