"""Load and validate a reward-pipeline YAML file once, with errors that name the file, line and key.

A pipeline file looks like::

    on_error: penalty        # raise | penalty | skip
    error_penalty: -1.0
    reward:
      type: ensemble         # any registered plugin type
      name: uwo              # optional; prefixes the plugin's log keys
      ...                    # that plugin's own typed fields

Validation runs every plugin's typed config (unknown keys, wrong types and missing paths fail) without
loading any model; `reward_plugins.pipeline.build_pipeline` then builds the plugins.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from .config_loader import ConfigError, Loc, Located, expand_path, read_yaml
from .registry import PluginConfig, plugin_class

__all__ = ["ConfigError", "ExistingPath", "PipelineConfig", "PluginSpec", "expand_path", "load_pipeline_config",
           "parse_pipeline_config"]


def _check_exists(value: str, info: ValidationInfo) -> str:
    value = expand_path(value)
    if (info.context or {}).get("check_paths", True) and not Path(value).exists():
        raise ValueError(f"path does not exist: {value}")
    return value


ExistingPath = Annotated[str, AfterValidator(_check_exists)]
"""A filesystem path that must exist when the config is loaded (env vars and `~` expanded)."""


def check_path_exists(value: str, info: ValidationInfo) -> str:
    """Validator for paths built at validation time (for example from a `{seed}` template)."""
    return _check_exists(value, info)


class Placement(BaseModel):
    """Where a model-backed plugin runs: `replicas` Ray actors, each holding `num_gpus` and `num_cpus`.

    A dead replica is restarted up to `max_restarts` times (-1: always) and its batch retried; one that does not
    answer a batch within `call_timeout_s` counts as dead (killed, restarted, its batch moved to a live replica);
    `ready_timeout_s` bounds the wait for the cluster to grant the resources.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_gpus: float = Field(default=1.0, ge=0)
    num_cpus: float = Field(default=1.0, ge=0)
    replicas: int = Field(default=1, ge=1)
    max_restarts: int = Field(default=3, ge=-1)
    ready_timeout_s: float = Field(default=600.0, gt=0)
    call_timeout_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _whole_or_fraction(self) -> Placement:
        if self.num_gpus > 1 and not float(self.num_gpus).is_integer():
            raise ValueError(f"num_gpus above 1 must be a whole number, got {self.num_gpus}")
        return self


@dataclass
class PluginSpec:
    """A validated plugin node: its registry type, unique name, typed config and nested children."""

    type: str
    name: str
    config: PluginConfig
    children: dict[Loc, PluginSpec] = field(default_factory=dict)
    loc: Loc = ()


class _PipelineFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reward: dict[str, Any]
    on_error: Literal["raise", "penalty", "skip"] = "raise"
    error_penalty: float | None = None
    name: str = "reward"

    @model_validator(mode="after")
    def _penalty_needs_value(self) -> _PipelineFields:
        if self.on_error == "penalty" and self.error_penalty is None:
            raise ValueError("on_error: penalty needs error_penalty (the reward an errored sample gets)")
        return self


@dataclass
class PipelineConfig:
    """A whole pipeline: the root plugin plus the error policy."""

    reward: PluginSpec
    on_error: Literal["raise", "penalty", "skip"]
    error_penalty: float | None
    name: str
    source: str = "<dict>"


def load_pipeline_config(path: str | os.PathLike, *, check_paths: bool = True) -> PipelineConfig:
    """Read and validate a pipeline YAML file. `check_paths=False` skips the existence checks of paths."""
    data, lines, located = read_yaml(path, "reward")
    return parse_pipeline_config(data, source=str(path), lines=lines, check_paths=check_paths, typed=located.typed)


def parse_pipeline_config(
    data: Any, *, source: str = "<dict>", lines: Mapping[Loc, int] | None = None, check_paths: bool = True,
    typed: Mapping[Loc, str] | None = None,
) -> PipelineConfig:
    """Validate an already-parsed pipeline mapping (e.g. built in code); `typed` is `Located.typed` of the file."""
    validator = _Validator(source, lines or {}, check_paths)
    validator.typed.update(typed or {})
    if not isinstance(data, Mapping):
        raise ConfigError([f"{source}: the file must hold a mapping with a 'reward' key"])
    try:
        fields = validator.validate(_PipelineFields, data)
    except ValidationError as exc:
        validator.add_pydantic(exc, ())
        raise ConfigError(validator.problems) from None
    root = validator.plugin(fields.reward, ("reward",))
    if validator.problems:
        raise ConfigError(validator.problems)
    return PipelineConfig(root, fields.on_error, fields.error_penalty, fields.name, source)


class _Validator(Located):
    def __init__(self, source: str, lines: Mapping[Loc, int], check_paths: bool):
        super().__init__(source, lines)
        self.check_paths = check_paths

    def plugin(self, raw: Any, loc: Loc) -> PluginSpec | None:
        if not isinstance(raw, Mapping):
            self.problem(loc, f"a plugin must be a mapping with a 'type' key, got {type(raw).__name__}")
            return None
        type_name = raw.get("type")
        if not isinstance(type_name, str):
            self.problem(loc + ("type",), "missing plugin type")
            return None
        try:
            cls = plugin_class(type_name)
        except KeyError as exc:
            self.problem(loc + ("type",), str(exc.args[0]))
            return None
        name = raw.get("name", type_name)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            self.problem(loc + ("name",), f"name must be letters, digits, '_', '.', '-', got {name!r}")
            return None
        fields = {k: v for k, v in raw.items() if k not in ("type", "name")}
        children = {loc_suffix: self.plugin(child, loc + loc_suffix) for loc_suffix, child in cls.child_specs(fields).items()}
        try:
            config = self.validate(cls.Config, fields, loc, context={"check_paths": self.check_paths})
        except ValidationError as exc:
            self.add_pydantic(exc, loc)
            return None
        if any(child is None for child in children.values()):
            return None
        return PluginSpec(type_name, name, config, children, loc)
