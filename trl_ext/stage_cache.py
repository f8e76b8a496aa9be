"""Pipeline stages cached by the settings they read (the demo's `data -> sft -> rms -> ... -> report`).

Each stage names the settings it reads and the stages whose outputs it reads; its key is a hash of both (the
upstream stages by their keys), so changing `rl_steps` changes the keys of RL and of every stage after it, and
of nothing else. A stage owns one folder under OUT with a `stage.json` marker (key, settings, status, seconds).
On a run, a stage whose marker has its key and status `done` is skipped; one with its key and status `running`
(interrupted) runs again and resumes inside; one with another key has its folder set aside under
`OUT/cache/FOLDER-KEY` and starts in a fresh folder (an old run folder is never handed to new settings), or
gets back the folder set aside earlier under its new key. Pure bookkeeping: no torch, no stage code here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reward_plugins.io import write_json

MARKER = "stage.json"
CACHE = "cache"


@dataclass(frozen=True)
class Stage:
    """One stage: what it reads (settings, some only under a condition; earlier stages) and the folder it owns."""

    name: str
    reads: tuple[str, ...]
    after: tuple[str, ...] = ()
    folder: str | None = None  # None: writes into an earlier stage's folder or OUT itself; never set aside
    marker: str | None = None  # where its marker lives when that is not FOLDER/stage.json
    reads_if: Mapping[str, tuple[str, Callable[[Any], bool]]] = field(default_factory=dict)  # setting: (when, test)
    version: int = 1  # bump when the stage's code changes what it writes

    def settings(self, cfg: Any) -> dict[str, Any]:
        """The settings this stage reads with `cfg`, and their values."""
        names = [*self.reads, *(name for name, (_, test) in self.reads_if.items() if test(cfg))]
        return {name: getattr(cfg, name) for name in names}

    def marker_path(self, out: Path) -> Path:
        if self.marker is not None:
            return out / self.marker
        return out / (self.folder or "stages") / (MARKER if self.folder else f"{self.name}.json")


def stage_keys(stages: Sequence[Stage], cfg: Any) -> dict[str, str]:
    """Each stage's key: a hash of its name, version, the values of the settings it reads and its upstream keys."""
    keys: dict[str, str] = {}
    for stage in stages:
        unknown = [name for name in stage.after if name not in keys]
        if unknown:
            raise ValueError(f"stage {stage.name} reads {unknown}, which do not come before it")
        payload = {"stage": stage.name, "version": stage.version, "settings": stage.settings(cfg),
                   "after": {name: keys[name] for name in stage.after}}
        keys[stage.name] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return keys


def downstream(stages: Sequence[Stage], changed: Iterable[str]) -> list[str]:
    """The stages that read, directly or through others, any of `changed` (stage names), in order."""
    hit = set(changed)
    for stage in stages:
        if hit.intersection(stage.after):
            hit.add(stage.name)
    return [stage.name for stage in stages if stage.name in hit]


def read_marker(out: Path, stage: Stage) -> dict[str, Any] | None:
    path = stage.marker_path(out)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn marker counts as none: the stage's folder is set aside and rebuilt


def is_done(out: Path, stage: Stage, key: str) -> bool:
    marker = read_marker(out, stage)
    return marker is not None and marker.get("key") == key and marker.get("status") == "done"


def prepare(out: Path, stage: Stage, key: str, cfg: Any) -> str:
    """Make the stage's folder hold its own earlier work (or nothing) for `key`; returns what happened:
    `resume` (same key, interrupted), `restored` (brought back from the cache), `set_aside` (the old folder
    moved to the cache) or `new`. Writes the marker with status `running`."""
    marker = read_marker(out, stage)
    seconds = 0.0
    happened = "new"
    if marker is not None and marker.get("key") == key:
        happened, seconds = "resume", float(marker.get("seconds", 0.0))
    elif stage.folder is not None:
        folder = out / stage.folder
        if folder.exists():
            old_key = (marker or {}).get("key", "unkeyed")
            aside = out / CACHE / f"{stage.folder.replace('/', '_')}-{old_key}"
            if aside.exists():
                shutil.rmtree(aside)
            aside.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(aside)
            happened = "set_aside"
        cached = out / CACHE / f"{stage.folder.replace('/', '_')}-{key}"
        if cached.exists():
            cached.rename(folder)
            restored = read_marker(out, stage) or {}
            if restored.get("status") == "done":
                return "restored"
            happened, seconds = "resume", float(restored.get("seconds", 0.0))
    write_marker(out, stage, key, cfg, "running", seconds)
    return happened


def write_marker(out: Path, stage: Stage, key: str, cfg: Any, status: str, seconds: float) -> None:
    write_json(stage.marker_path(out), {"stage": stage.name, "key": key, "status": status, "seconds": round(seconds, 1),
                                        "settings": stage.settings(cfg), "after": list(stage.after)})


def finish(out: Path, stage: Stage, key: str, cfg: Any, seconds: float) -> float:
    """Mark the stage done, adding `seconds` to the time earlier interrupted tries spent; returns the total."""
    marker = read_marker(out, stage) or {}
    total = float(marker.get("seconds", 0.0)) + seconds
    write_marker(out, stage, key, cfg, "done", total)
    return total


def stage_seconds(out: Path, stages: Sequence[Stage]) -> dict[str, float]:
    """Seconds each current stage took when it ran (its marker's), whatever later runs skipped."""
    seconds = {}
    for stage in stages:
        marker = read_marker(out, stage)
        if marker is not None:
            seconds[stage.name] = marker.get("seconds", 0.0)
    return seconds


def unread(stages: Sequence[Stage], cfg: Any, given: Iterable[str], runner: Iterable[str] = ()) -> list[str]:
    """The given settings that no stage (nor the runner itself) reads with `cfg`, in the order given."""
    read = set(runner).union(*(stage.settings(cfg) for stage in stages))
    return [name for name in given if name not in read]
