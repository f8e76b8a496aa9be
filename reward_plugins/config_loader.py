"""The one YAML loader for every configuration file (reward pipelines, RL / SFT / RM training presets).

Every string in the file gets `${VAR}` and `${VAR:-default}` expanded; `--set key.path=value` overrides are
applied on top; the result is validated into a pydantic model. Every problem is reported as
`file:line: key.path: message` under a title naming the kind of file ("invalid train configuration").
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)

OVERRIDE_SOURCE = "--set"


class ConfigError(ValueError):
    """One or more problems in a configuration, each as `file:line: key.path: message`."""

    def __init__(self, problems: list[str], kind: str = "reward"):
        self.problems = problems
        self.kind = kind
        super().__init__(f"invalid {kind} configuration:\n  " + "\n  ".join(problems))

    def __reduce__(self):
        """Rebuilt from its problems (e.g. raised in a worker process or a Ray actor)."""
        return type(self), (self.problems, self.kind)


_BRACED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _substitute(pattern: re.Pattern, value: str) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(3)
        if name in os.environ:
            return os.environ[name]
        if match.group(2) is not None:
            return match.group(2)
        raise ValueError(f"environment variable {name} is not set (in {value!r}); set it or write ${{{name}:-default}}")

    return pattern.sub(replace, value)


def expand_env(value: str) -> str:
    """Expand `${VAR}` and `${VAR:-default}` (not bare `$VAR`); an unset variable without default is an error."""
    return _substitute(_BRACED, value)


def expand_path(value: str) -> str:
    """Expand `~`, `$VAR`, `${VAR}` and `${VAR:-default}`; an unset variable without default is an error."""
    return os.path.expanduser(_substitute(_ENV_REFERENCE, value))


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _scalar(text: str) -> Any:
    """A value that was one whole `${VAR}` reference, read as a YAML scalar (so `3`, `1e-5` and `true` keep their
    types); anything else stays text."""
    if _NUMBER.fullmatch(text.strip()):
        return float(text) if any(c in text for c in ".eE") else int(text)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, bool) else text


def key_lines(node: yaml.Node | None, loc: Loc = ()) -> dict[Loc, int]:
    """Map every key path in a composed YAML document to its 1-based line number."""
    lines: dict[Loc, int] = {}
    if node is None:
        return lines
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = loc + (key_node.value,)
            lines.update(key_lines(value_node, child))
            lines[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(key_lines(item, loc + (index,)))
    return lines


def nearest_line(lines: Mapping[Loc, int], loc: Loc) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


class Located:
    """Formats problems as `file:line: key: message` from a key->line map (overridden keys name `--set`)."""

    def __init__(self, source: str, lines: Mapping[Loc, int] | None = None, overridden: Sequence[Loc] = ()):
        self.source = source
        self.lines = lines or {}
        self.overridden = list(overridden)
        self.problems: list[str] = []
        self.typed: dict[Loc, str] = {}  # values typed from one whole `${VAR}`, with their text

    def validate(self, model: type[M], data: Any, prefix: Loc = (), context: dict[str, Any] | None = None) -> M:
        """`model.model_validate(data)`, where a whole `${VAR}` typed as a number or boolean stays text if its field
        wants a string: the value takes the field's type (`port: ${P:-80}` is 80, `name: ${N:-007}` is "007")."""
        try:
            return model.model_validate(data, context=context)
        except ValidationError as exc:
            texts = {}
            for err in exc.errors():
                loc = tuple(err["loc"])
                if err["type"] == "string_type" and prefix + loc in self.typed:
                    texts[loc] = self.typed[prefix + loc]
            if not texts:
                raise
        return model.model_validate(_with_values(data, texts), context=context)

    def where(self, loc: Loc) -> str:
        for key in self.overridden:
            if loc[: len(key)] == key:
                return OVERRIDE_SOURCE
        line = nearest_line(self.lines, loc)
        return f"{self.source}:{line}" if line is not None else self.source

    def problem(self, loc: Loc, message: str) -> None:
        key = ".".join(str(part) for part in loc) or "<top>"
        self.problems.append(f"{self.where(loc)}: {key}: {message}")

    def add_pydantic(self, exc: ValidationError, prefix: Loc = ()) -> None:
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            self.problem(prefix + tuple(err["loc"]), message)


def expand_tree(data: Any, located: Located, loc: Loc = ()) -> Any:
    """A copy of `data` with `${VAR}` / `${VAR:-default}` expanded in every string; problems go to `located`."""
    if isinstance(data, str):
        try:
            expanded = expand_env(data)
        except ValueError as exc:
            located.problem(loc, str(exc))
            return data
        if expanded != data and _BRACED.fullmatch(data.strip()):
            value = _scalar(expanded)
            if not isinstance(value, str):
                located.typed[loc] = expanded
            return value
        return expanded
    if isinstance(data, Mapping):
        return {key: expand_tree(value, located, loc + (key,)) for key, value in data.items()}
    if isinstance(data, list):
        return [expand_tree(value, located, loc + (index,)) for index, value in enumerate(data)]
    return data


def _with_values(data: Any, values: Mapping[Loc, Any]) -> Any:
    """A copy of `data` with the value at each key path replaced."""
    data = copy.deepcopy(data)
    for loc, value in values.items():
        node = data
        for part in loc[:-1]:
            node = node[part]
        node[loc[-1]] = value
    return data


def read_yaml(path: str | os.PathLike, kind: str) -> tuple[Any, dict[Loc, int], Located]:
    """Parse a YAML file with env expansion; returns (data, key->line map, problem collector)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{source}: no such file"], kind) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read: {exc}"], kind) from None
    try:
        data = yaml.safe_load(text)
        lines = key_lines(yaml.compose(text))
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"], kind) from None
    located = Located(source, lines)
    data = expand_tree(data, located)
    if located.problems:
        raise ConfigError(located.problems, kind)
    return data, lines, located


def parse_override(text: str, kind: str = "train") -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so numbers, booleans and lists work)."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected key.path=value"], kind)
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError([f"--set {text!r}: empty key"], kind)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError([f"--set {text!r}: value is not valid YAML: {exc}"], kind) from None
    if isinstance(value, str):
        try:
            value = expand_env(value)
        except ValueError as exc:
            raise ConfigError([f"--set {text!r}: {exc}"], kind) from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], kind: str = "train") -> tuple[dict[str, Any], list[Loc]]:
    """A copy of `data` with each `key.path=value` set (intermediate mappings created), and the keys set."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    keys: list[Loc] = []
    for text in overrides:
        path, value = parse_override(text, kind)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"--set {text!r}: {part} is not a mapping"], kind)
            node = child
        node[path[-1]] = value
        keys.append(tuple(path))
    return data, keys


def load_model(model: type[M], path: str | os.PathLike | None, overrides: Sequence[str] = (), *, kind: str,
               context: dict[str, Any] | None = None) -> M:
    """Read a YAML file (or start empty), expand env vars, apply overrides, validate into `model`.

    A model may define `config_problems(self) -> list[(key path, message)]` for checks beyond its fields (for
    example keys of a free-form section); they are reported with file and line like the others."""
    data: Any = {}
    located = Located("<command line>")
    if path is not None:
        data, _, located = read_yaml(path, kind)
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: expected a mapping at the top level"], kind)
    data, located.overridden = apply_overrides(data, overrides, kind)
    try:
        config = located.validate(model, data, context=context)
    except ValidationError as exc:
        located.add_pydantic(exc)
        raise ConfigError(located.problems, kind) from None
    for loc, message in getattr(config, "config_problems", lambda: [])():
        located.problem(tuple(loc), message)
    if located.problems:
        raise ConfigError(located.problems, kind)
    return config
