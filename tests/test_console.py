"""What training prints: the main metrics on a bar, a table at the end instead of a dict per step, rank 0 only,
and each third-party warning once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

from trl_ext import console


def test_bar_metrics_pick_and_shorten():
    logs = {"reward": 0.123456, "kl": 1e-7, "loss": 2, "completions/mean_length": 8.0, "note": "x", "lr": None}
    assert console.bar_metrics(logs) == {"reward": "0.1235", "kl": "1e-07", "loss": "2"}
    assert console.bar_metrics({"objective/scores": 1.5, "objective/kl": 0.25}) == {"scores": "1.5", "kl": "0.25"}


def test_bar_and_table_never_prints_a_dict(capsys):
    callback = console.BarAndTable()
    state = SimpleNamespace(is_world_process_zero=True, max_steps=3, global_step=0)
    callback.on_train_begin(None, state, None)
    for step in (1, 2, 3):
        state.global_step = step
        callback.on_step_end(None, state, None)
        callback.on_log(None, state, None, logs={"reward": 0.5 * step, "kl": 0.1, "loss": 1.0, "step": step})
    callback.on_log(None, state, None, logs={"train_runtime": 1.0, "train_loss": 0.9})
    callback.on_train_end(None, state, None)
    err = capsys.readouterr().err
    assert "{" not in err and "'reward'" not in err
    assert "last logged metrics (step 3)" in err and "train_loss" in err and "1.5" in err


def test_other_ranks_keep_quiet(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not console.is_main_process() and console.progress_bar(10) is None and console.current_step() is None
    console.advance(None, {"reward": 1.0})
    console.close_bar(None, {"reward": 1.0})


def test_progress_bar_counts_steps_for_ctrl_c(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    bar = console.progress_bar(5, done=2)
    console.advance(bar, {"objective/scores": 0.5})
    assert console.current_step() == 3
    console.close_bar(bar, {"objective/scores": 0.5})
    assert console.current_step() is None and "last logged metrics (step 3)" in capsys.readouterr().err


SCRIPT = """
import logging, os, warnings
from transformers.utils import logging as hf_logging
from trl_ext.console import setup_output
hf_logging.set_verbosity_warning()
setup_output()
for _ in range(3):
    hf_logging.get_logger("transformers.trainer").warning("the same advice")  # transformers' own handler
    logging.getLogger("a_library.module").warning("a library note")
    logging.getLogger("trl_ext.train").warning("ours, every time")
    logging.getLogger("trl_ext.train").info("progress note")
    warnings.warn("deprecated thing", FutureWarning)
"""


def run_script(rank: str) -> str:
    """stderr of a fresh process that sets up output like a training command and logs a few things three times."""
    env = {**os.environ, "RANK": rank}
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120).stderr


def test_a_third_party_warning_is_shown_once():
    err = run_script("0")
    assert err.count("the same advice") == 1 and err.count("a library note") == 1
    assert err.count("deprecated thing") == 1
    assert err.count("ours, every time") == 3 and err.count("progress note") == 3


def test_other_ranks_log_warnings_only():
    err = run_script("1")
    assert err.count("ours, every time") == 3 and "progress note" not in err


def test_a_host_that_set_up_logging_is_left_alone(monkeypatch):
    root = logging.getLogger()
    before = (list(root.handlers), [list(h.filters) for h in root.handlers], root.level)
    console.setup_output()
    assert (list(root.handlers), [list(h.filters) for h in root.handlers], root.level) == before
