"""Ray adapter for `reward_plugins.placement`: placed plugins as Ray actors holding GPUs in the running cluster.

`RayPlacer` checks up front that the cluster can ever hold what the YAML asks, starts `replicas` actors per
placement (`max_restarts` lets Ray restart a dead one), splits each batch across them and gathers in order.
A replica that dies, or does not answer its share within `call_timeout_s` (a stopped or hung process), is taken
out of the live set (killed in the second case, so that Ray restarts it) and its share moves to a live replica;
it rejoins once the restarted actor answers. With no live replica a batch waits up to `call_timeout_s` for one to
come back, then fails with `PlacementError` (a `ScoringUnavailable`: never a per-sample error), and
`RayPlacer.unavailable` says why, so the reward server answers 503 and clients go elsewhere.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from reward_plugins.config import Placement
from reward_plugins.placement import split_even
from reward_plugins.types import ScoringUnavailable

logger = logging.getLogger(__name__)
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): ")


class PlacementError(ScoringUnavailable):
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
            "max_task_retries": 0,  # a dead replica's share moves to a live one at once instead of waiting for it
        }
        if runtime_env:
            options["runtime_env"] = runtime_env
        self.actors = [_Replica.options(**options).remote(factory) for _ in range(placement.replicas)]
        self.alive = list(range(len(self.actors)))
        self.reviving: dict[int, Any] = {}  # slot -> pid() call of a replica that is restarting
        self.gone: set[int] = set()
        self.losses = [0] * len(self.actors)  # each loss uses one of Ray's max_restarts
        self._lock = threading.RLock()  # the server's health check and its scoring thread both update the sets
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
        self.refresh()
        if not self.alive:
            self.await_revival()
        live = list(self.alive)
        deadline = time.monotonic() + self.placement.call_timeout_s
        jobs = [
            _Job(chunk, slot, self.actors[slot].call.remote(method, items[chunk]), deadline)
            for chunk, slot in zip(split_even(len(items), len(live)), live)
        ]
        return _RayPending(self, method, items, jobs)

    def call_one(self, method: str, *args: Any) -> Any:
        """`method(*args)` on one live replica (for example the plugin's component keys)."""
        while True:
            self.refresh()
            if not self.alive:
                self.await_revival()
            slot = self.alive[0]
            try:
                return _get(self.actors[slot].call.remote(method, *args), self.placement.call_timeout_s)
            except RayActorError:
                self.lost(slot, killed=False)
            except GetTimeoutError:
                self.lost(slot, killed=True)

    def pids(self) -> list[int]:
        """Process ids of the live replicas (a restarted replica has a new one)."""
        return ray.get([self.actors[slot].pid.remote() for slot in self.alive])

    def lost(self, slot: int, killed: bool) -> None:
        """Take a replica out of the live set: it died, or it missed its deadline and is killed (Ray restarts it)."""
        with self._lock:
            if slot not in self.alive:
                return
            self.alive.remove(slot)
            if killed:
                ray.kill(self.actors[slot], no_restart=False)
            self.losses[slot] += 1
            if 0 <= self.placement.max_restarts < self.losses[slot]:
                self.gone.add(slot)
            else:
                self.reviving[slot] = self.actors[slot].pid.remote()
        logger.warning(
            "%s: replica %d %s; its work moves to the %d live replica(s), it rejoins if Ray restarts it (max_restarts %d)",
            self.name, slot, f"missed its {_fmt(self.placement.call_timeout_s)} s deadline and was killed" if killed
            else "died", len(self.alive), self.placement.max_restarts,
        )

    def refresh(self, timeout: float = 0.0) -> None:
        """Return restarted replicas that answer to the live set; forget those Ray will not restart."""
        waiting = dict(self.reviving)
        if not waiting:
            return
        ready, _ = ray.wait(list(waiting.values()), num_returns=len(waiting), timeout=timeout)
        for slot, ref in waiting.items():
            if ref not in ready:
                continue
            with self._lock:
                if self.reviving.get(slot) is not ref:
                    continue  # another thread settled it
                try:
                    ray.get(ref)
                except ActorUnavailableError:
                    self.reviving[slot] = self.actors[slot].pid.remote()
                    continue
                except RayActorError:
                    del self.reviving[slot]
                    self.gone.add(slot)
                    logger.warning("%s: replica %d is gone for good (max_restarts %d)", self.name, slot,
                                   self.placement.max_restarts)
                    continue
                del self.reviving[slot]
                self.alive = sorted([*self.alive, slot])
            logger.info("%s: replica %d is back", self.name, slot)

    def await_revival(self) -> None:
        """With no live replica, wait up to `call_timeout_s` for a restarted one; PlacementError if none comes."""
        deadline = time.monotonic() + self.placement.call_timeout_s
        while not self.alive and self.reviving and time.monotonic() < deadline:
            self.refresh(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        if not self.alive:
            raise PlacementError(self.unavailable() or f"{self.name}: no live replica")

    def unavailable(self) -> str | None:
        """Why this group cannot score now (no live replica), else None."""
        self.refresh()
        if self.alive:
            return None
        return (f"{self.name}: no live replica ({len(self.reviving)} restarting, {len(self.gone)} gone for good, "
                f"max_restarts {self.placement.max_restarts})")

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.alive = []
        self.reviving = {}


@dataclass
class _Job:
    chunk: slice
    slot: int
    ref: Any
    deadline: float


class _RayPending:
    """One submitted batch; `result` waits, moving the share of a dead or late replica to a live one."""

    def __init__(self, group: RayReplicas, method: str, items: list, jobs: list[_Job]):
        self.group, self.method, self.items, self.jobs = group, method, items, jobs

    def result(self) -> list:
        gathered: list = []
        group = self.group
        for job in self.jobs:
            while True:
                try:
                    gathered.extend(_get(job.ref, max(0.0, job.deadline - time.monotonic())))
                    break
                except RayActorError:
                    group.lost(job.slot, killed=False)
                except GetTimeoutError:
                    group.lost(job.slot, killed=True)
                group.refresh()
                if not group.alive:
                    group.await_revival()
                live = list(group.alive)
                job.slot = live[job.chunk.start % len(live)]
                job.ref = group.actors[job.slot].call.remote(self.method, self.items[job.chunk])
                job.deadline = time.monotonic() + group.placement.call_timeout_s
        if len(gathered) != len(self.items):
            raise PlacementError(f"{group.name}: replicas returned {len(gathered)} results for {len(self.items)} items")
        return gathered


def _get(ref: Any, timeout: float | None = None) -> Any:
    """`ray.get`, re-raising an exception from inside the replica as itself (the caller isolates bad samples)."""
    try:
        return ray.get(ref, timeout=timeout)
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

    def unavailable(self) -> str | None:
        """Why a placed plugin cannot score now (one of its groups has no live replica), else None."""
        reasons = [reason for reason in (group.unavailable() for group in self.groups) if reason]
        return "; ".join(reasons) or None

    def close(self) -> None:
        for group in self.groups:
            group.close()
        self.groups = []


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` ("auto": the local one) unless this process already has."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)
