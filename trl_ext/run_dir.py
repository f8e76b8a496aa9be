"""A run folder belongs to one set of settings: GRPO, RLOO, PPO, SFT and RM training all open theirs here.

The folder records the settings that shape its run (`run_settings.json`: reward config content hash, algorithm,
policy with its resolved revision, learning rate and schedule, batch sizes, world size, seed). A rerun resumes
from the last checkpoint only when they match; otherwise it is refused in one line that names the differences.
`--fresh` moves the old folder aside (`OUT.old-1`, `OUT.old-2`, ...; nothing is deleted) and starts over;
`--resume force` continues whatever was recorded and records the new settings beside the old ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from reward_plugins.cli import Interrupted, UsageError
from reward_plugins.io import write_json
from reward_plugins.model_ref import describe

logger = logging.getLogger(__name__)

SETTINGS_FILE = "run_settings.json"
ResumeMode = Literal["auto", "force", "fresh"]
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunMismatch(UsageError):
    """The run folder was made with other settings (or holds something else); the message names the differences."""


def add_resume_flags(parser: argparse.ArgumentParser) -> None:
    """`--fresh` and `--resume {auto,force}`, the same on every training command."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fresh", action="store_true",
                       help="start over: move an existing output folder aside to OUT.old-N (nothing is deleted)")
    group.add_argument("--resume", choices=["auto", "force"], default="auto",
                       help="auto (default): resume only a run made with the same settings; force: resume anyway")


def resume_mode(args: argparse.Namespace) -> ResumeMode:
    return "fresh" if args.fresh else args.resume


def content_hash(path: str | os.PathLike) -> str:
    """`sha256:` and the first 16 hex digits of a file's bytes."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def last_checkpoint(out: Path) -> Path | None:
    """The highest `checkpoint-N` folder of `out` that holds files (a half-written `.tmp` one never counts)."""
    if not out.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()
             and any(p.iterdir())]
    return max(found)[1] if found else None


def differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """`key recorded -> wanted` for every setting that differs (missing on one side counts)."""
    return [f"{key} {recorded.get(key, '(none)')} -> {wanted.get(key, '(none)')}"
            for key in sorted(set(recorded) | set(wanted)) if recorded.get(key) != wanted.get(key)]


def read_settings(out: Path) -> dict[str, Any] | None:
    path = out / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunMismatch(f"{path} cannot be read ({exc}); --fresh moves the folder aside and starts over") from None


def set_aside(out: Path) -> Path:
    """Rename `out` to the first free `OUT.old-N`; returns the new name."""
    n = 1
    while (target := out.with_name(f"{out.name}.old-{n}")).exists():
        n += 1
    out.rename(target)
    return target


def open_run_dir(out: str | os.PathLike, settings: Mapping[str, Any], mode: ResumeMode = "auto",
                 find_checkpoint: Callable[[Path], Path | None] = last_checkpoint) -> Path | None:
    """Check the run folder `out` against `settings`; returns the checkpoint to resume from (None: step 0).

    Every process decides from the folder as it finds it, so all ranks agree; only rank 0 moves or writes."""
    out = Path(out)
    settings = json.loads(json.dumps(dict(settings)))  # the JSON form, as compared with the recorded one
    main = is_main_process()
    if mode == "fresh":
        if main and out.exists() and any(out.iterdir()):
            moved = set_aside(out)
            print(f"--fresh: moved the old run folder {out} to {moved}", flush=True)
        record(out, settings, None)
        return None
    recorded = read_settings(out)
    if recorded is not None and not any(p.name != SETTINGS_FILE for p in out.iterdir()):
        recorded = None  # set up, but nothing written yet (e.g. stopped by bad data): nothing to protect
    if recorded is None:
        if out.is_dir() and any(p.name != SETTINGS_FILE for p in out.iterdir()) and mode != "force":
            raise RunMismatch(f"{out} already holds files but no {SETTINGS_FILE} (another run, or made by hand): "
                              "--fresh moves it aside and starts over, --resume force trains into it anyway")
    else:
        changed = differences(recorded.get("settings", {}), settings)
        if changed and mode != "force":
            raise RunMismatch(f"{out} was trained with other settings: {'; '.join(changed)}. --fresh moves it "
                              "aside and starts over; --resume force continues it anyway")
        if changed:
            logger.warning("--resume force: continuing %s despite: %s", out, "; ".join(changed))
    record(out, settings, recorded)
    return find_checkpoint(out)


def record(out: Path, settings: dict[str, Any], recorded: dict[str, Any] | None) -> None:
    """Write the settings (rank 0 only); settings a forced resume replaced are kept under `earlier`."""
    if not is_main_process():
        return
    earlier = list((recorded or {}).get("earlier", []))
    if recorded is not None and recorded.get("settings") != settings:
        earlier.append(recorded.get("settings"))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SETTINGS_FILE, {"settings": settings, **({"earlier": earlier} if earlier else {})})


def trainer_settings(config_cls: type, values: Mapping[str, Any], **shaping: Any) -> dict[str, Any]:
    """The settings that shape a transformers/TRL run: the `values` its config class (a dataclass such as
    GRPOConfig) would be built with, over the class's defaults, plus `shaping` (algorithm, model, reward config or
    data hashes). Read without building the config, which under torchrun would already join the process group."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls) if f.default is not dataclasses.MISSING}

    def get(name: str) -> Any:
        value = values.get(name, defaults.get(name))
        return getattr(value, "value", value)  # enums (lr_scheduler_type) as their names

    out = {**shaping, "learning_rate": get("learning_rate"), "lr_schedule": str(get("lr_scheduler_type")),
           "warmup_steps": get("warmup_steps"), "batch_size": get("per_device_train_batch_size"),
           "gradient_accumulation_steps": get("gradient_accumulation_steps"), "world_size": world_size(),
           "seed": get("seed")}
    if get("num_generations") is not None:
        out["num_generations"] = get("num_generations")
    return out


def ppo_settings(cfg: Any) -> dict[str, Any]:
    """The settings that shape a PPO run (`trl_ext.ppo`), from a TrainConfig with its `ppo` section."""
    ppo = cfg.ppo
    return {"algorithm": "ppo", "policy": describe(cfg.policy), "reward_config": content_hash(cfg.reward_config),
            "value_init": ppo.value_init, "value_model": describe(ppo.value_model),
            "learning_rate": ppo.learning_rate, "lr_schedule": ppo.lr_schedule, "batch_size": ppo.batch_size,
            "mini_batch_size": ppo.mini_batch_size, "ppo_epochs": ppo.ppo_epochs, "world_size": world_size(),
            "seed": cfg.seed}


@contextlib.contextmanager
def stop_cleanly(out: str | os.PathLike, step: Callable[[], int | None]) -> Iterator[None]:
    """Turn Ctrl-C during training into `Interrupted` with the one line saying where the same command resumes."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(out, step())) from None


def interrupted_message(out: str | os.PathLike, step: int | None) -> str:
    """The one line printed on Ctrl-C: where training stopped and where the same command resumes."""
    at = f"interrupted at step {step}" if step is not None else "interrupted"
    checkpoint = last_checkpoint(Path(out))
    if checkpoint is None:
        return f"{at}; no checkpoint yet, so the same command starts over"
    return f"{at}; the same command resumes from {checkpoint.name}"
