"""What training prints: a progress bar with the main metrics and a table at the end instead of raw trainer dicts,
one process speaking under torchrun, and each third-party warning once."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from transformers.trainer_callback import ProgressCallback

# Shown on the bar, in this order, when the trainer logs them (TRL's and our PPO's names).
BAR_KEYS = ("reward", "objective/scores", "kl", "objective/kl", "loss", "loss/policy_avg", "learning_rate", "lr")


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


class _Once(logging.Filter):
    """Let each distinct warning message through once per process."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.name.split(".")[0] in ("reward_plugins", "trl_ext"):
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def setup_output() -> None:
    """Logging for a training command: INFO on rank 0, warnings only elsewhere; repeated library warnings shown once.
    A process whose logging is already set up (an application or test runner calling `main`) is left as it is."""
    root = logging.getLogger()
    if root.handlers:
        return
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    once = _Once()
    loggers = [root, *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    for handler in {h for lg in loggers for h in lg.handlers}:  # libraries with their own handler (transformers)
        handler.addFilter(once)
    warnings.simplefilter("once")


def bar_metrics(logs: Mapping[str, Any], keys: Sequence[str] = BAR_KEYS) -> dict[str, str]:
    """The few numbers worth a glance, formatted short, from a trainer's log dict."""
    return {key.split("/")[-1]: f"{logs[key]:.4g}" for key in keys if isinstance(logs.get(key), (int, float))}


def metrics_table(title: str, logs: Mapping[str, Any]):
    """A rich table of every numeric metric of one log record."""
    from rich.table import Table

    table = Table(title=title, min_width=len(title) + 2)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(logs.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            table.add_row(key, f"{value:.4g}")
    return table


class BarAndTable(ProgressCallback):
    """transformers' progress bar, with the main metrics on the bar instead of a dict printed per log step, and a
    table of the last logged metrics when training ends."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, Any] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            if any(key.startswith("train_") for key in logs):  # the closing summary: kept for the table
                self.last.update(logs)
                return
            self.last = {**self.last, **logs}
            self.training_bar.set_postfix(bar_metrics(logs), refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        if state.is_world_process_zero and self.last:
            from rich.console import Console

            Console(stderr=True).print(metrics_table(f"last logged metrics (step {state.global_step})", self.last))


_ACTIVE: list[Any] = []  # the bar of the training loop running in this process, for `current_step`


def progress_bar(total: int, done: int = 0):
    """A training-steps bar (rank 0 only; None elsewhere); `current_step` reads it on Ctrl-C."""
    if not is_main_process():
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)
    _ACTIVE[:] = [bar]
    return bar


def advance(bar, metrics: Mapping[str, Any]) -> None:
    """One step done: move the bar and show the main metrics on it."""
    if bar is not None:
        bar.set_postfix(bar_metrics(metrics), refresh=False)
        bar.update(1)


def close_bar(bar, last: Mapping[str, Any], title: str = "last logged metrics") -> None:
    """Close the bar and print the last metrics as a table."""
    if bar is None:
        return
    bar.close()
    _ACTIVE.clear()
    if last:
        from rich.console import Console

        Console(stderr=True).print(metrics_table(f"{title} (step {bar.n})", last))


def current_step() -> int | None:
    """Steps done by the training loop of this process (its bar's count), if one is running."""
    return _ACTIVE[0].n if _ACTIVE else None


def use_bar_and_table(trainer) -> None:
    """Swap a transformers Trainer's dict-printing progress callback for `BarAndTable`."""
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(BarAndTable())
