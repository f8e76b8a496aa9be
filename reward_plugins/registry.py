"""Plugin base class and the name -> class registry (built-ins plus the `reward_plugins.plugins` entry points)."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from .types import RewardResult, Sample, ScoringUnavailable

if TYPE_CHECKING:
    from .config import PluginSpec

_logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "reward_plugins.plugins"

# Modules whose import registers the built-in plugins.
_BUILTIN_MODULES = (
    "reward_plugins.reward_model",
    "reward_plugins.ensemble",
    "reward_plugins.multihead",
    "reward_plugins.lora_ensemble",
    "reward_plugins.vrcli",
    "reward_plugins.penalties",
    "reward_plugins.combinators",
)

_REGISTRY: dict[str, type[RewardPlugin]] = {}
_loaded = False


class PluginConfig(BaseModel):
    """Base for every plugin's typed configuration: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RewardPlugin(ABC):
    """A batch-first reward: `score(samples)` returns one `RewardResult` per sample, in order.

    A plugin never raises for one bad sample: it returns `RewardResult.failed(...)` for that sample and
    scores the rest. `component_keys` lists, before any call, every component name its results carry.
    """

    Config: ClassVar[type[PluginConfig]]
    type_name: ClassVar[str]

    def __init__(self, config: PluginConfig, name: str):
        self.config = config
        self.name = name

    @property
    @abstractmethod
    def component_keys(self) -> tuple[str, ...]: ...

    @abstractmethod
    def score(self, samples: Sequence[Sample]) -> list[RewardResult]: ...

    @classmethod
    def child_specs(cls, fields: Mapping[str, Any]) -> dict[tuple, Any]:
        """Nested plugin specs in the raw `fields`, keyed by location (composites override this).

        It reads the raw mapping, not the validated config, so children are checked even when the
        parent has errors of its own and every problem is reported at once.
        """
        return {}

    @classmethod
    def from_spec(cls, spec: PluginSpec, build: Callable[[PluginSpec], RewardPlugin]) -> RewardPlugin:
        """Construct from a validated spec; composite plugins override this to build their children."""
        return cls(spec.config, spec.name)


def register_plugin(type_name: str) -> Callable[[type[RewardPlugin]], type[RewardPlugin]]:
    """Class decorator: make a plugin available under `type:` in YAML."""

    def decorate(cls: type[RewardPlugin]) -> type[RewardPlugin]:
        existing = _REGISTRY.get(type_name)
        if existing is not None and existing is not cls:
            raise ValueError(f"plugin type {type_name!r} is already registered by {existing.__module__}")
        cls.type_name = type_name
        _REGISTRY[type_name] = cls
        return cls

    return decorate


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()
        if isinstance(loaded, type) and issubclass(loaded, RewardPlugin) and entry_point.name not in _REGISTRY:
            register_plugin(entry_point.name)(loaded)


def plugin_class(type_name: str) -> type[RewardPlugin]:
    _load_all()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise KeyError(f"unknown plugin type {type_name!r}; known: {', '.join(available_plugins())}") from None


def available_plugins() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def score_safely(plugin: RewardPlugin, samples: Sequence[Sample]) -> list[RewardResult]:
    """Call `plugin.score`; if it raises, score one sample at a time so one bad sample cannot sink the batch.

    Samples that still raise get an error result carrying the exception text. `ScoringUnavailable` (the scorer
    itself is gone) is raised as it is: it says nothing about the samples.
    """
    if not samples:
        return []
    try:
        return _checked(plugin, samples, plugin.score(samples))
    except ScoringUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - isolated below, never swallowed
        if len(samples) == 1:
            return [RewardResult.failed(f"{plugin.name}: {type(exc).__name__}: {exc}")]
        _logger.warning("%s failed on a batch of %d (%s); retrying one sample at a time", plugin.name, len(samples), exc)
    results = []
    for sample in samples:
        try:
            results.extend(_checked(plugin, [sample], plugin.score([sample])))
        except ScoringUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001
            results.append(RewardResult.failed(f"{plugin.name}: {type(exc).__name__}: {exc}"))
    return results


def _checked(plugin: RewardPlugin, samples: Sequence[Sample], results: list[RewardResult]) -> list[RewardResult]:
    if len(results) != len(samples):
        raise RuntimeError(f"plugin {plugin.name} returned {len(results)} results for {len(samples)} samples")
    return results


def plugin_tree(plugin: RewardPlugin) -> list[RewardPlugin]:
    """Every plugin in a built plugin tree, `plugin` included."""
    found, stack, seen = [], [plugin], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        found.append(node)
        for value in vars(node).values():
            children = value if isinstance(value, (list, tuple)) else value.values() if isinstance(value, dict) else [value]
            stack.extend(child for child in children if isinstance(child, RewardPlugin))
    return found


def check_baselines(plugin: RewardPlugin, labels: Sequence[Any]) -> None:
    """Refuse labels whose baselines do not match a `vrcli` plugin of the tree (at load or on the first batch);
    placed VR-CLI plugins check in a replica, against the scorer they hold."""
    for node in plugin_tree(plugin):
        check = getattr(node, "check_labels", None)
        if check is not None:
            check(labels)
