"""The synthetic demo task: the gold rule by hand, and the generated files' formats and label noise."""

from __future__ import annotations

import random

import pytest

from reward_plugins.io import read_jsonl
from setup_data import synthetic_task as st


def test_gold_reward_by_hand():
    assert st.gold_reward(" apple, pear, plum", 3, "fruits") == 1.0
    assert st.gold_reward(" apple, apple", 2, "fruits") == pytest.approx(0.5 - 0.25)  # a repeat is a bad item
    assert st.gold_reward(" apple, red, pear", 2, "fruits") == pytest.approx(1.0 - 0.25)  # off-category item
    assert st.gold_reward(" apple, pear, plum, peach", 2, "fruits") == pytest.approx(1.0 - 0.5)  # too many
    assert st.gold_reward("  ", 2, "fruits") == -0.5
    with pytest.raises(ValueError, match="unknown category"):
        st.gold_reward("x", 1, "planets")


def test_prompt_round_trip_and_perfect_answers():
    rng = random.Random(3)
    for task in st.sample_tasks(20, rng):
        assert st.task_from_prompt(task.prompt) == task
        assert st.gold_reward(st.perfect_response(task, rng), task.k, task.category) == 1.0


def test_files_have_our_formats_and_the_asked_label_noise(tmp_path):
    paths = st.write_task_files(tmp_path, seed=1, n_sft=30, n_pref=400, n_rl=12, n_eval=5, label_noise=0.25)
    sft = read_jsonl(paths["sft"])
    assert len(sft) == 30 and all(set(r) == {"prompt", "completion"} for r in sft)
    prefs = read_jsonl(paths["prefs"])
    flipped = [r["label"]["flipped"] for r in prefs]
    assert 0.18 < sum(flipped) / len(flipped) < 0.32
    for r in prefs:
        gold_chosen = st.gold_reward(r["chosen"], r["label"]["k"], r["label"]["category"])
        gold_rejected = st.gold_reward(r["rejected"], r["label"]["k"], r["label"]["category"])
        assert (gold_chosen < gold_rejected) == r["label"]["flipped"] and gold_chosen != gold_rejected
    assert not any(r["label"]["flipped"] for r in read_jsonl(paths["prefs_test"]))
    prompts = read_jsonl(paths["prompts"])
    assert [r["label"]["id"] for r in prompts] == list(range(12))
    assert all(st.task_from_prompt(r["prompt"]).label == {k: r["label"][k] for k in ("k", "category")} for r in prompts)
