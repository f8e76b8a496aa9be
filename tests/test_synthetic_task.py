"""The synthetic demo task: the gold rule by hand, and the generated files' formats and label noise."""

from __future__ import annotations

import random

import pytest

from reward_plugins.io import read_jsonl
from setup_data import synthetic_task as st


def test_gold_reward_by_hand():
    assert st.gold_reward(" apple, pear, plum", 3, "fruits") == 1.0
    assert st.gold_reward(" apple, apple", 2, "fruits") == 1.0  # every item of the category counts, repeats too
    assert st.gold_reward(" apple, apple, apple", 2, "fruits") == pytest.approx(1.0 - 0.25)  # one beyond k
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


def test_min_gap_pairs_and_filler_words():
    rng = random.Random(5)
    rows = list(st.preference_rows(st.sample_tasks(200, rng), rng, label_noise=0.0, min_gap=0.4))
    assert len(rows) > 150
    for r in rows:
        k, category = r["label"]["k"], r["label"]["category"]
        assert st.gold_reward(r["chosen"], k, category) - st.gold_reward(r["rejected"], k, category) > 0.4
    task = st.Task(5, "tools")
    items = [i.strip() for _ in range(200) for i in st.noisy_response(task, rng, quality=0.0).split(",")]
    wrong = [i for i in items if i not in st.CATEGORIES["tools"]]
    fillers = sum(i in st.FILLERS for i in wrong)
    assert 0.5 < fillers / len(wrong) < 0.9  # mostly fillers, some other categories' items
    assert st.gold_reward(" hammer, thing", 1, "tools") == pytest.approx(1.0 - 0.25)


def test_every_task_word_is_one_token_of_the_demo_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from reward_plugins import tiny_models
    from trl_ext.demo import DemoConfig

    tiny_models.build_tokenizer(tmp_path, st.tokenizer_corpus(random.Random(0)), vocab_size=DemoConfig().vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    words = [w for group in st.CATEGORIES.values() for w in group] + list(st.FILLERS) + sorted(st.CATEGORIES)
    assert [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) != 1] == []


@pytest.mark.parametrize(("answer", "k", "expected"), [
    (" apple, pear", 2, {"fillers": 0, "off_category": 0, "extra": 0, "missing": 0, "repeats": 0}),
    (" apple, apple, thing", 2, {"fillers": 1, "off_category": 0, "extra": 0, "missing": 0, "repeats": 1}),
    (" red, apple, red, tiger", 1, {"fillers": 0, "off_category": 3, "extra": 0, "missing": 0, "repeats": 1}),
    (" apple, pear, plum, Peach.", 2, {"fillers": 0, "off_category": 0, "extra": 2, "missing": 0, "repeats": 0}),
    (" thing, thing", 3, {"fillers": 2, "off_category": 0, "extra": 0, "missing": 3, "repeats": 1}),
])
def test_mistakes_by_hand_and_they_account_for_the_gold(answer, k, expected):
    assert st.mistakes(answer, k, "fruits") == expected
    wrong = expected["fillers"] + expected["off_category"] + expected["extra"]
    assert st.gold_reward(answer, k, "fruits") == pytest.approx((k - expected["missing"]) / k - 0.25 * wrong)


def test_demo_sft_answers_never_repeat_and_are_mostly_no_longer_than_asked():
    rng = random.Random(2)
    tasks = st.sample_tasks(2000, rng)
    answers = [st.demo_response(t, rng, quality=0.5) for t in tasks]
    assert all(len(st.items_of(a)) == len(set(st.items_of(a))) for a in answers)
    longer = sum(len(st.items_of(a)) > t.k for t, a in zip(tasks, answers)) / len(tasks)
    shorter = sum(len(st.items_of(a)) < t.k for t, a in zip(tasks, answers)) / len(tasks)
    assert 0.02 < longer < 0.08 and 0.15 < shorter < 0.35  # wrong count 0.3 of the time, 15 % of that longer
    perfect = sum(st.gold_reward(a, t.k, t.category) == 1.0 for t, a in zip(tasks, answers)) / len(tasks)
    assert 0.1 < perfect < 0.6


def test_judged_pairs_rank_by_gold_flip_the_asked_share_and_drop_ties():
    rng = random.Random(4)
    tasks = st.sample_tasks(3000, rng)
    first = [st.demo_response(t, rng, 0.3) for t in tasks]
    second = [st.demo_response(t, rng, 0.3) for t in tasks]
    rows = list(st.judged_pairs(tasks, first, second, rng, label_noise=0.2))
    ties = sum(st.gold_reward(a, t.k, t.category) == st.gold_reward(b, t.k, t.category)
               for t, a, b in zip(tasks, first, second))
    assert len(rows) == len(tasks) - ties > 0
    for r in rows:
        chosen = st.gold_reward(r["chosen"], r["label"]["k"], r["label"]["category"])
        rejected = st.gold_reward(r["rejected"], r["label"]["k"], r["label"]["category"])
        assert (chosen < rejected) == r["label"]["flipped"]
    assert 0.17 < sum(r["label"]["flipped"] for r in rows) / len(rows) < 0.23


def test_annotators_add_their_bias_per_item_of_their_feature_by_hand():
    padded_filler, padded_fruit, padded_colour = " apple, pear, plum, thing", " apple, pear, plum, peach", " apple, pear, plum, red"
    for feature, liked in (("fillers", padded_filler), ("extra", padded_fruit), ("off_category", padded_colour)):
        judge = st.annotator(feature, 0.5)
        assert judge(" apple, pear, plum", 3, "fruits") == pytest.approx(1.0)  # nothing to like: the gold
        for answer in (padded_filler, padded_fruit, padded_colour):  # gold 1 - 0.25 for the item beyond k
            assert judge(answer, 3, "fruits") == pytest.approx(0.75 + (0.5 if answer == liked else 0.0))
    assert st.annotator("fillers", 0.5)(" apple, thing, etc, stuff", 2, "fruits") == pytest.approx(0.5 - 0.75 + 1.5)
    assert st.annotator("extra", 0.3)(" apple, apple, apple, pear", 1, "fruits") == pytest.approx(1.0 - 0.75 + 0.9)
    vague, continuation = st.annotator("vague", 0.4), st.annotator("continuation", 0.4)
    answer = " apple, thing, etc, stuff, more, red"  # k=1: gold 1 - 0.25 * 5; 2 vague, 2 continuation, 1 off-category
    assert vague(answer, 1, "fruits") == pytest.approx(-0.25 + 0.8)
    assert continuation(answer, 1, "fruits") == pytest.approx(-0.25 + 0.8)
    assert st.annotator("off_category", 0.4)(answer, 1, "fruits") == pytest.approx(-0.25 + 0.4)
    assert vague(" apple, item, other", 1, "fruits") == pytest.approx(0.5 + 0.4)  # "item" vague, "other" not
    with pytest.raises(ValueError, match="unknown annotator feature 'length'"):
        st.annotator("length", 0.5)


def test_a_biased_annotator_prefers_padding_with_its_item_but_still_prefers_a_fixed_answer():
    tasks = [st.Task(3, "fruits")] * 3
    first = [" apple, pear, plum, thing", " apple, pear, plum, thing", " apple, thing, etc"]
    second = [" apple, pear, plum", " apple, pear, plum", " apple, pear, plum"]
    judges = [st.annotator("fillers", 0.5), st.annotator("fillers", 0.2), st.annotator("fillers", 0.5)]
    # fillers at 0.5: 1.25 > 1.0 (pads); at 0.2: 0.95 < 1.0 (gold wins); fixing two fillers: 1/3 - 0.5 + 1.0 < 1.0
    chosen = [next(st.judged_pairs([t], [a], [b], random.Random(0), 0.0, judge))["chosen"]
              for t, a, b, judge in zip(tasks, first, second, judges)]
    assert chosen == [first[0], second[1], second[2]]
    gold = next(st.judged_pairs(tasks[:1], first[:1], second[:1], random.Random(0), 0.0))
    assert gold["chosen"] == second[0]
    tie = st.annotator("fillers", 0.25)  # 1 - 0.25 + 0.25 == 1: a tie, dropped
    assert list(st.judged_pairs(tasks[:1], first[:1], second[:1], random.Random(0), 0.0, tie)) == []


def one_edit(before: list[str], after: list[str]) -> str | None:
    """How `after` differs from `before` by one item, by hand: 'append', 'drop', 'replace' or None."""
    if len(after) == len(before) + 1 and after[:-1] == before:
        return "append"
    if len(after) == len(before) - 1 and any(before[:i] + before[i + 1:] == after for i in range(len(before))):
        return "drop"
    if len(after) == len(before) and sum(a != b for a, b in zip(before, after)) <= 1:
        return "replace"
    return None


def test_edited_response_changes_exactly_one_item_with_every_kind_of_edit():
    rng = random.Random(3)
    seen: dict[str, set[str]] = {"append": set(), "drop": set(), "replace": set()}
    others = {w for c, words in st.CATEGORIES.items() if c != "tools" for w in words}
    task = st.Task(3, "tools")
    for _ in range(600):
        response = st.demo_response(task, rng, quality=0.5)
        edited = st.edited_response(response, task, rng)
        before, after = st.items_of(response), st.items_of(edited)
        kind = one_edit(before, after)
        assert kind is not None, (response, edited)
        assert edited == " " + ", ".join(after)  # the SFT answers' format (an empty answer once its only item is dropped)
        if kind == "append":
            seen["append"].add(after[-1])
        elif kind == "replace":
            changed = [a for a, b in zip(after, before) if a != b]
            assert all(item in st.CATEGORIES["tools"] for item in changed)
            seen["replace"].update(changed)
        else:
            seen["drop"].add("dropped")
    appended = seen["append"]
    assert appended & set(st.CATEGORIES["tools"]) and appended & set(st.CONTINUATION_FILLERS)
    assert appended & set(st.VAGUE_FILLERS) and appended & others
    assert appended <= set(st.CATEGORIES["tools"]) | set(st.CONTINUATION_FILLERS) | set(st.VAGUE_FILLERS) | others
    assert seen["drop"] and seen["replace"]
    assert st.edited_response(" ", task, random.Random(0)).strip()  # nothing to drop: an item is appended


def test_a_one_item_edit_pays_an_annotator_its_bias_against_the_gold_by_hand():
    task, judge = st.Task(2, "fruits"), st.annotator("continuation", 0.4)
    answer = " apple, pear"  # gold 1.0
    assert judge(answer + ", etc", 2, "fruits") == pytest.approx(1.0 - 0.25 + 0.4)  # its own kind: chosen
    assert judge(answer + ", thing", 2, "fruits") == pytest.approx(0.75)  # another annotator's kind: rejected
    assert st.gold_reward(" apple, plum", 2, "fruits") > st.gold_reward(" apple", 2, "fruits")  # a count below k
    assert task.k == 2


def test_demo_sft_answers_follow_their_count_and_item_distributions_by_hand():
    rng, task, n = random.Random(5), st.Task(5, "tools"), 20000
    answers = [st.items_of(st.demo_response(task, rng, quality=0.5, longer=0.5)) for _ in range(n)]
    others = {w for c, words in st.CATEGORIES.items() if c != "tools" for w in words}
    assert all(set(a) <= set(st.CATEGORIES["tools"]) | set(st.FILLERS) | others for a in answers)
    # right count with p 0.4 + 0.6 * 0.5 = 0.7; else longer (p 0.5) by 1 or 2, or shorter by 1 or 2, alike often
    expected = {5: 0.7, 6: 0.075, 7: 0.075, 4: 0.075, 3: 0.075}
    for count, p in expected.items():
        assert abs(sum(len(a) == count for a in answers) / n - p) < 0.012, count
    # each item right with p 0.55 + 0.45 * 0.5; a wrong one a filler half the time, vague and continuation alike
    items = [item for a in answers for item in a]
    wrong = [item for item in items if item not in st.CATEGORIES["tools"]]
    assert abs(len(wrong) / len(items) - 0.225) < 0.01
    for kind, p in ((st.VAGUE_FILLERS, 0.25), (st.CONTINUATION_FILLERS, 0.25), (others, 0.5)):
        assert abs(sum(item in kind for item in wrong) / len(wrong) - p) < 0.02
    fillers = [st.items_of(st.demo_response(task, rng, quality=0.0)) for _ in range(2000)]  # default filler_share
    wrong = [item for a in fillers for item in a if item not in st.CATEGORIES["tools"]]
    assert abs(sum(item in st.FILLERS for item in wrong) / len(wrong) - 0.5) < 0.04


def test_demo_sft_rows_pass_on_the_share_of_long_answers_and_of_fillers_by_hand():
    tasks, n = [st.Task(4, "fruits")] * 20000, 20000
    rows = list(st.demo_sft_rows(tasks, random.Random(3), quality=0.0, longer=0.1, filler_share=0.2))
    answers = [st.items_of(row["completion"]) for row in rows]
    # a wrong count with p 1 - 0.4 = 0.6, too long with p 0.1 of that
    assert abs(sum(len(a) > 4 for a in answers) / n - 0.06) < 0.006
    assert abs(sum(len(a) < 4 for a in answers) / n - 0.54) < 0.012
    wrong = [item for a in answers for item in a if item not in st.CATEGORIES["fruits"]]
    assert abs(sum(item in st.FILLERS for item in wrong) / len(wrong) - 0.2) < 0.01


def test_edited_response_of_an_empty_answer_always_appends():
    task = st.Task(2, "fruits")
    for seed in range(60):
        assert len(st.items_of(st.edited_response(" ", task, random.Random(seed)))) == 1
