"""What training prints: the main metrics on a bar, a table at the end instead of a dict per step, rank 0 only,
and each third-party warning once."""

from __future__ import annotations

import io
import logging
import warnings
from types import SimpleNamespace

import pytest

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


@pytest.fixture()
def quiet_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    root.handlers = [logging.StreamHandler(stream)]
    yield stream
    root.handlers, root.level = handlers, level


def test_a_third_party_warning_is_shown_once(quiet_root, monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("RANK", raising=False)
    hf_stream = io.StringIO()
    for handler in logging.getLogger("transformers").handlers:
        if isinstance(handler, logging.StreamHandler):
            monkeypatch.setattr(handler, "stream", hf_stream)
    hf_logging.set_verbosity_warning()
    try:
        with warnings.catch_warnings(record=True) as caught:
            console.setup_output()
            for _ in range(3):
                hf_logging.get_logger("transformers.trainer").warning("the same advice")  # its own handler
                logging.getLogger("a_library.module").warning("a library note")
                logging.getLogger("trl_ext.train").warning("ours, every time")
                warnings.warn("deprecated thing", FutureWarning, stacklevel=1)
                warnings.warn("deprecated thing", FutureWarning, stacklevel=1)
    finally:
        hf_logging.set_verbosity_error()
    lines = quiet_root.getvalue().splitlines()
    assert lines.count("a library note") == 1 and lines.count("ours, every time") == 3
    assert hf_stream.getvalue().count("the same advice") == 1
    assert len([w for w in caught if "deprecated thing" in str(w.message)]) == 1
    assert logging.getLogger().level == logging.INFO


def test_other_ranks_log_warnings_only(quiet_root, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    logging.getLogger().setLevel(logging.NOTSET)
    with warnings.catch_warnings():
        console.setup_output()
    assert logging.getLogger().level == logging.WARNING
