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

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from .registry import PluginConfig, plugin_class

Loc = tuple[str | int, ...]


class ConfigError(ValueError):
    """One or more problems in a configuration, each as `file:line: key.path: message`."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid reward configuration:\n  " + "\n  ".join(problems))


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand_path(value: str) -> str:
    """Expand `~`, `$VAR`, `${VAR}` and `${VAR:-default}`; an unset variable without default is an error."""

    def substitute(match: re.Match) -> str:
        name = match.group(1) or match.group(3)
        if name in os.environ:
            return os.environ[name]
        if match.group(2) is not None:
            return match.group(2)
        raise ValueError(f"environment variable {name} is not set (in {value!r})")

    return os.path.expanduser(_ENV_REFERENCE.sub(substitute, value))


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

    A dead replica is restarted up to `max_restarts` times (-1: always) and its batch retried;
    `ready_timeout_s` bounds the wait for the cluster to grant the resources.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_gpus: float = Field(default=1.0, ge=0)
    num_cpus: float = Field(default=1.0, ge=0)
    replicas: int = Field(default=1, ge=1)
    max_restarts: int = Field(default=3, ge=-1)
    ready_timeout_s: float = Field(default=600.0, gt=0)

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
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from exc
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    return parse_pipeline_config(data, source=str(path), lines=lines, check_paths=check_paths)


def parse_pipeline_config(
    data: Any, *, source: str = "<dict>", lines: Mapping[Loc, int] | None = None, check_paths: bool = True
) -> PipelineConfig:
    """Validate an already-parsed pipeline mapping (e.g. built in code)."""
    validator = _Validator(source, lines or {}, check_paths)
    if not isinstance(data, Mapping):
        raise ConfigError([f"{source}: the file must hold a mapping with a 'reward' key"])
    try:
        fields = _PipelineFields.model_validate(data)
    except ValidationError as exc:
        validator.add_pydantic(exc, ())
        raise ConfigError(validator.problems) from None
    root = validator.plugin(fields.reward, ("reward",))
    if validator.problems:
        raise ConfigError(validator.problems)
    return PipelineConfig(root, fields.on_error, fields.error_penalty, fields.name, source)


class _Validator:
    def __init__(self, source: str, lines: Mapping[Loc, int], check_paths: bool):
        self.source = source
        self.lines = lines
        self.check_paths = check_paths
        self.problems: list[str] = []

    def problem(self, loc: Loc, message: str) -> None:
        line = _nearest_line(self.lines, loc)
        where = f"{self.source}:{line}" if line is not None else self.source
        key = ".".join(str(part) for part in loc) or "<top>"
        self.problems.append(f"{where}: {key}: {message}")

    def add_pydantic(self, exc: ValidationError, prefix: Loc) -> None:
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            self.problem(prefix + tuple(err["loc"]), message)

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
            config = cls.Config.model_validate(fields, context={"check_paths": self.check_paths})
        except ValidationError as exc:
            self.add_pydantic(exc, loc)
            return None
        if any(child is None for child in children.values()):
            return None
        return PluginSpec(type_name, name, config, children, loc)


def _key_lines(node: yaml.Node | None, loc: Loc = ()) -> dict[Loc, int]:
    """Map every key path in a composed YAML document to its 1-based line number."""
    lines: dict[Loc, int] = {}
    if node is None:
        return lines
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = loc + (key_node.value,)
            lines.update(_key_lines(value_node, child))
            lines[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_key_lines(item, loc + (index,)))
    return lines


def _nearest_line(lines: Mapping[Loc, int], loc: Loc) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None
