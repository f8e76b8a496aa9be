"""Typed YAML presets for the TRL entry points, through the project's one config loader (`--set a.b=value` overrides)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import AfterValidator, BaseModel

from reward_plugins.config_loader import ConfigError, expand_path, load_model

__all__ = ["ConfigError", "ExistingPath", "existing", "load_config"]

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
