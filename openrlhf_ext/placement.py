"""Ray adapter for `reward_plugins.placement`: placed plugins as Ray actors holding GPUs in the running cluster.

`RayPlacer` checks up front that the cluster can ever hold what the YAML asks, starts `replicas` actors per
placement (`max_restarts` lets Ray restart a dead one), splits each batch across them and gathers in order.
A batch whose actor died is retried by Ray on the restarted actor (`max_task_retries`); if an actor is gone
for good, its share moves to a live replica, so no sample is lost while one replica lives.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from reward_plugins.config import Placement
from reward_plugins.placement import split_even

logger = logging.getLogger(__name__)
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): ")


class PlacementError(RuntimeError):
    """The cluster cannot run a placement, or every replica of one is gone; the message says what and why."""


@ray.remote
class _Replica:
    """One copy of a placed object; Ray re-runs `factory()` when it restarts the actor."""

    def __init__(self, factory: Callable[[], Any]):
        self.obj = factory()

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.obj, method)(*args)

    def pid(self) -> int:
        return os.getpid()


def _fmt(value: float) -> str:
    return f"{value:g}"


def failure_text(message: str) -> str:
    """The exception line(s) at the end of a remote traceback, without the traceback itself."""
    lines = message.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
    return "\n".join(lines[starts[-1] :]) if starts else (lines[-1] if lines else message)


def unsatisfiable(requests: Sequence[tuple[str, Placement]], nodes: Sequence[Mapping[str, float]]) -> str | None:
    """Why the cluster (alive nodes' total resources) can never hold `requests`, or None when it can."""
    problems = []
    for resource, field in (("GPU", "num_gpus"), ("CPU", "num_cpus")):
        asks = [(name, p.replicas, getattr(p, field)) for name, p in requests if getattr(p, field) > 0]
        if not asks:
            continue
        total = sum(replicas * each for _, replicas, each in asks)
        have = [float(node.get(resource, 0.0)) for node in nodes]
        detail = ", ".join(f"{name}: {replicas} x {_fmt(each)}" for name, replicas, each in asks)
        if total > sum(have) + 1e-9:
            problems.append(
                f"asked {_fmt(total)} {resource}s in total ({detail}), the Ray cluster has {_fmt(sum(have))} "
                f"({len(have)} node(s): {', '.join(_fmt(h) for h in have) or 'none'})"
            )
        widest = max(have, default=0.0)
        for name, _, each in asks:
            if each > widest + 1e-9:
                problems.append(
                    f"{name} asks {_fmt(each)} {resource}s per replica, the largest node has {_fmt(widest)}"
                )
    if not problems:
        return None
    return "placement cannot be satisfied: " + "; ".join(problems) + (
        ". Lower num_gpus / num_cpus / replicas in the reward YAML's placement (fractions share a GPU), or add nodes"
    )


class RayReplicas:
    """`replicas` actors built from one factory; `submit` splits a batch over the live ones."""

    def __init__(self, factory: Callable[[], Any], placement: Placement, name: str, runtime_env: dict | None = None):
        self.name = name
        self.placement = placement
        options = {
            "num_cpus": placement.num_cpus,
            "num_gpus": placement.num_gpus,
            "max_restarts": placement.max_restarts,
            "max_task_retries": placement.max_restarts,
        }
        if runtime_env:
            options["runtime_env"] = runtime_env
        self.actors = [_Replica.options(**options).remote(factory) for _ in range(placement.replicas)]
        self.alive = list(range(len(self.actors)))
        self._wait_ready()

    def _wait_ready(self) -> None:
        refs = [actor.pid.remote() for actor in self.actors]
        try:
            ray.get(refs, timeout=self.placement.ready_timeout_s)
        except GetTimeoutError:
            self.close()
            available = ray.available_resources()
            raise PlacementError(
                f"{self.name}: {self.placement.replicas} replica(s) x {_fmt(self.placement.num_gpus)} GPU, "
                f"{_fmt(self.placement.num_cpus)} CPU not granted within {_fmt(self.placement.ready_timeout_s)} s; "
                f"the cluster has {_fmt(ray.cluster_resources().get('GPU', 0))} GPUs, "
                f"{_fmt(available.get('GPU', 0))} free (GPUs reserved by placement groups, e.g. OpenRLHF's "
                "--train.colocate_all, are not free for reward actors)"
            ) from None
        except RayActorError as exc:
            self.close()
            raise PlacementError(f"{self.name}: a replica failed to start: {failure_text(str(exc))}") from None

    def submit(self, method: str, items: Sequence) -> _RayPending:
        """Start `method(chunk)` on every live replica, one contiguous chunk each."""
        items = list(items)
        if not self.alive:
            raise PlacementError(f"{self.name}: every replica has died (max_restarts {self.placement.max_restarts})")
        chunks = split_even(len(items), len(self.alive))
        jobs = [
            _Job(chunk, slot, self.actors[slot].call.remote(method, items[chunk]))
            for chunk, slot in zip(chunks, self.alive)
        ]
        return _RayPending(self, method, items, jobs)

    def call_one(self, method: str, *args: Any) -> Any:
        """`method(*args)` on one live replica (for example the plugin's component keys)."""
        while self.alive:
            slot = self.alive[0]
            try:
                return _get(self.actors[slot].call.remote(method, *args))
            except RayActorError:
                self._lost(slot)
        raise PlacementError(f"{self.name}: every replica has died (max_restarts {self.placement.max_restarts})")

    def pids(self) -> list[int]:
        """Process ids of the live replicas (a restarted replica has a new one)."""
        return ray.get([self.actors[slot].pid.remote() for slot in self.alive])

    def _lost(self, slot: int) -> None:
        if slot in self.alive:
            self.alive.remove(slot)
            logger.warning(
                "%s: replica %d is gone for good (max_restarts %d); %d left",
                self.name,
                slot,
                self.placement.max_restarts,
                len(self.alive),
            )

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.alive = []


@dataclass
class _Job:
    chunk: slice
    slot: int
    ref: Any


class _RayPending:
    """One submitted batch; `result` waits, moves the share of a replica gone for good to a live one."""

    def __init__(self, group: RayReplicas, method: str, items: list, jobs: list[_Job]):
        self.group, self.method, self.items, self.jobs = group, method, items, jobs

    def result(self) -> list:
        gathered: list = []
        for job in self.jobs:
            while True:
                try:
                    gathered.extend(_get(job.ref))
                    break
                except RayActorError:
                    self.group._lost(job.slot)
                    if not self.group.alive:
                        restarts = self.group.placement.max_restarts
                        raise PlacementError(
                            f"{self.group.name}: every replica has died (max_restarts {restarts}); "
                            f"{len(self.items)} items not scored"
                        ) from None
                    job.slot = self.group.alive[job.chunk.start % len(self.group.alive)]
                    job.ref = self.group.actors[job.slot].call.remote(self.method, self.items[job.chunk])
        if len(gathered) != len(self.items):
            raise PlacementError(
                f"{self.group.name}: replicas returned {len(gathered)} results for {len(self.items)} items"
            )
        return gathered


def _get(ref: Any) -> Any:
    """`ray.get`, re-raising an exception from inside the replica as itself (the caller isolates bad samples)."""
    try:
        return ray.get(ref)
    except RayTaskError as exc:
        if isinstance(exc.cause, Exception) and not isinstance(exc.cause, RayActorError):
            raise exc.cause from None
        raise


class RayPlacer:
    """`reward_plugins.placement.Placer` on the running Ray cluster (connect first with `connect`)."""

    def __init__(self, runtime_env: dict | None = None):
        self.runtime_env = runtime_env
        self.groups: list[RayReplicas] = []

    def check(self, requests: Sequence[tuple[str, Placement]]) -> None:
        if not requests:
            return
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        problem = unsatisfiable(requests, nodes)
        if problem:
            raise PlacementError(problem)

    def place(self, factory: Callable[[], Any], placement: Placement, name: str) -> RayReplicas:
        group = RayReplicas(factory, placement, name, self.runtime_env)
        self.groups.append(group)
        logger.info(
            "%s: %d replica(s) ready (%s GPU, %s CPU each)",
            name,
            placement.replicas,
            _fmt(placement.num_gpus),
            _fmt(placement.num_cpus),
        )
        return group

    def close(self) -> None:
        for group in self.groups:
            group.close()
        self.groups = []


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` ("auto": the local one) unless this process already has."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)
