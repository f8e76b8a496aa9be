"""Placed plugins: model-backed plugins built in remote replicas through a `Placer`, with no cluster import here.

A `placement:` in the YAML (on a `reward_model`, an `ensemble` or its members, a VR-CLI `scorer`) asks for the
plugin to run in replicas that hold GPUs. The edge that knows the cluster engine supplies the `Placer`
(`openrlhf_ext.placement.RayPlacer`); this module only describes what to build there and how to split and
gather batches, so `reward_plugins` stays free of Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from .config import Placement, PluginSpec
from .registry import PluginConfig, RewardPlugin, check_baselines
from .types import RewardResult, Sample

if TYPE_CHECKING:
    from .reward_model import RewardModelConfig

logger = logging.getLogger(__name__)


class Pending(Protocol):
    """Results of one submitted batch, in the order of its items."""

    def result(self) -> list: ...


class Replicas(Protocol):
    """A group of remote copies of one object; `submit` splits `items` across them."""

    def submit(self, method: str, items: Sequence) -> Pending: ...

    def call_one(self, method: str, *args: Any) -> Any: ...

    def close(self) -> None: ...


class Placer(Protocol):
    """Builds `factory()` in `placement.replicas` remote replicas holding the placement's resources."""

    def check(self, requests: Sequence[tuple[str, Placement]]) -> None: ...

    def place(self, factory: Callable[[], Any], placement: Placement, name: str) -> Replicas: ...


def split_even(count: int, parts: int) -> list[slice]:
    """Contiguous slices of `range(count)` over at most `parts` workers, sizes differing by at most one."""
    if parts < 1:
        raise ValueError("parts must be at least 1")
    parts = min(parts, count)
    if parts == 0:
        return []
    base, extra = divmod(count, parts)
    slices, start = [], 0
    for index in range(parts):
        stop = start + base + (index < extra)
        slices.append(slice(start, stop))
        start = stop
    return slices


def plugin_placement(config: PluginConfig) -> Placement | None:
    """The placement that moves a whole plugin: its own `placement`, or its `scorer.placement` (VR-CLI)."""
    own = getattr(config, "placement", None)
    return own if own is not None else getattr(getattr(config, "scorer", None), "placement", None)


def _placeable(value: Any) -> Iterator[BaseModel]:
    """Configs with a `placement` field (model-backed ones) anywhere under `value`, `value` excluded."""
    if isinstance(value, BaseModel):
        children = [getattr(value, key) for key in type(value).model_fields]
    else:
        children = value if isinstance(value, (list, tuple)) else []
    for child in children:
        if isinstance(child, BaseModel) and "placement" in type(child).model_fields:
            yield child
        yield from _placeable(child)


def _unplaced(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, BaseModel):
        if "placement" in type(value).model_fields:
            if value.placement is not None:
                return
            if next(_placeable(value), None) is None:
                if getattr(value, "backend", "hf") != "external":
                    yield path
                return
        for key in type(value).model_fields:
            yield from _unplaced(getattr(value, key), f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _unplaced(item, f"{path}.{index}")


def unplaced_models(spec: PluginSpec) -> list[str]:
    """Every model this spec tree would load in the calling process: model configs without a placement.

    A placement covers the models under it (an ensemble's covers its members); a scorer with
    `backend: external` loads nothing.
    """
    where = ".".join(str(part) for part in spec.loc) or spec.name
    found = [f"{path} ({spec.type} {spec.name})" for path in _unplaced(spec.config, where)]
    for child in spec.children.values():
        found.extend(unplaced_models(child))
    return found


def placement_requests(spec: PluginSpec) -> list[tuple[str, Placement]]:
    """(name, placement) of every group of replicas building `spec` would start, for an up-front resource check."""
    placement = plugin_placement(spec.config)
    if placement is not None:
        return [(spec.name, placement)]
    requests = []
    members = getattr(spec.config, "members", None) or []  # an ensemble's, named by its validated member_names
    for name, member in zip(getattr(spec.config, "member_names", ()), members):
        if getattr(member, "placement", None) is not None:
            requests.append((f"{spec.name}.{name}", member.placement))
    for child in spec.children.values():
        requests.extend(placement_requests(child))
    return requests


def warn_unplaced(name: str) -> None:
    """Say that a placement is ignored because nothing here can place it."""
    logger.warning(
        "%s has a placement but this process has no placer (Ray); its model loads here. "
        "Build through openrlhf_ext (launch, serve --ray-address) to place it.",
        name,
    )


class PluginWorker:
    """What runs in each replica of a placed plugin: the plugin built locally by `build` (placements ignored)."""

    def __init__(self, spec: PluginSpec, build: Callable[[PluginSpec], RewardPlugin]):
        self.plugin = build(spec)

    def component_keys(self) -> tuple[str, ...]:
        return tuple(self.plugin.component_keys)

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return self.plugin.score(samples)

    def check_baselines(self, labels: Sequence[Any]) -> None:
        check_baselines(self.plugin, labels)


class PlacedPlugin(RewardPlugin):
    """A plugin whose replicas run elsewhere: each batch is split across them and gathered in order."""

    def __init__(self, spec: PluginSpec, replicas: Replicas):
        super().__init__(spec.config, spec.name)
        self.type_name = spec.type
        self.replicas = replicas
        self._keys = tuple(replicas.call_one("component_keys"))

    @classmethod
    def build(cls, spec: PluginSpec, placement: Placement, placer: Placer,
              build_local: Callable[[PluginSpec], RewardPlugin]) -> PlacedPlugin:
        """Replicas of `spec`, each built by `build_local` (a module-level function, so it travels to them)."""
        return cls(spec, placer.place(partial(PluginWorker, spec, build_local), placement, spec.name))

    @property
    def component_keys(self) -> tuple[str, ...]:
        return self._keys

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        return self.replicas.submit("score", list(samples)).result()

    def check_labels(self, labels: Sequence[Any]) -> None:
        """A placed VR-CLI plugin checks baseline fingerprints in one replica, against the scorer it holds."""
        if self.type_name == "vrcli":
            self.replicas.call_one("check_baselines", list(labels))


class MemberWorker:
    """What runs in each replica of a placed ensemble member: one reward model scoring samples."""

    def __init__(self, config: RewardModelConfig):
        from .reward_model import RewardModelScorer

        self.scorer = RewardModelScorer(config)

    def score_samples(self, samples: Sequence[Sample]) -> list[float]:
        return self.scorer.score_texts([self.scorer.format_sample(s) for s in samples])[0].tolist()


class PlacedMember:
    """An ensemble member in remote replicas; `submit` returns at once so members score in parallel."""

    def __init__(self, config: RewardModelConfig, name: str, placer: Placer):
        self.config = config
        self.replicas = placer.place(partial(MemberWorker, config), config.placement, name)

    def submit(self, samples: Sequence[Sample]) -> Pending:
        return self.replicas.submit("score_samples", list(samples))
