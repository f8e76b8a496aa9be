"""Typed YAML presets for the TRL entry points, with `--set a.b=value` overrides, validated once at load."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ValidationError

from reward_plugins.config import ConfigError, expand_path

M = TypeVar("M", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so numbers, booleans and lists work)."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected key.path=value"])
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError([f"--set {text!r}: empty key"])
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError([f"--set {text!r}: value is not valid YAML: {exc}"]) from exc
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with each `key.path=value` set (intermediate mappings are created)."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"--set {text!r}: {part} is not a mapping"])
            node = child
        node[path[-1]] = value
    return data


def load_config(model: type[M], path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> M:
    """Read a YAML preset (or start empty), apply overrides, validate into `model`; errors name file and key."""
    source = str(path) if path is not None else "<command line>"
    data: Any = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError([f"{source}: cannot read: {exc}"]) from exc
        if not isinstance(data, dict):
            raise ConfigError([f"{source}: expected a mapping at the top level"])
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<top>"
            message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            problems.append(f"{source}: {key}: {message}")
        raise ConfigError(problems) from None


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
