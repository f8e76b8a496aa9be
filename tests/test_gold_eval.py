"""`python -m evaluation.run_ppo_gold_eval` on a tiny gold RM: scores, templates, idempotence, resumption, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation import run_ppo_gold_eval
from evaluation.eval_files import EvalFile, EvalRow, list_eval_files, read_eval_file, write_eval_file
from evaluation.rm_text import alpacafarm_text
from reward_plugins.io import DataError
from reward_plugins.reward_model import RewardModelConfig, RewardModelScorer

PROMPTS = ["Write a short story about a dragon.", "List three fruits.", "Explain the storm over the harbour."]
ANSWERS = ["The dragon learns to paint.", "apple, banana, cherry", "A ship in trouble near the harbour."]




def make_eval_dir(path, steps=(0, 100)):
    for k, step in enumerate(steps):
        rows = [EvalRow(prompt=p, answer=f"{a} {step}", proxy_score=0.1 * i, kl=0.5 * k)
                for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS))]
        write_eval_file(path, EvalFile(step=step, rows=rows, kl=0.5 * k, kl_history=[0.5 * j for j in range(k + 1)]))
    return path


def direct(rm_dir, texts):
    return RewardModelScorer(RewardModelConfig(path=str(rm_dir))).score_texts(texts)[0]


def test_adds_gold_scores_in_oa_format_and_is_idempotent(tmp_path, rm_dirs, monkeypatch):
    eval_dir = make_eval_dir(tmp_path / "eval")
    changed = run_ppo_gold_eval.main([str(eval_dir), str(rm_dirs[4]), "--batch-size", "2"])
    assert len(changed) == 2
    for path in list_eval_files(eval_dir):
        ef = read_eval_file(path)
        texts = [f"<|prompter|>{r.prompt}<|endoftext|><|assistant|>{r.answer}<|endoftext|>" for r in ef.rows]
        np.testing.assert_allclose([r.gold_score for r in ef.rows], direct(rm_dirs[4], texts), rtol=1e-5)
        assert [r.proxy_score for r in ef.rows] == pytest.approx([0.0, 0.1, 0.2])  # the rest is untouched
        assert ef.meta["gold_rm"] == str(rm_dirs[4].resolve())
    before = {p: p.read_bytes() for p in list_eval_files(eval_dir)}

    def refuse(self, config):
        raise AssertionError("nothing left to score: the gold RM must not be loaded")

    monkeypatch.setattr(RewardModelScorer, "__init__", refuse)
    assert run_ppo_gold_eval.main([str(eval_dir), str(rm_dirs[4])]) == []
    assert {p: p.read_bytes() for p in list_eval_files(eval_dir)} == before


def test_alpacafarm_format(tmp_path, rm_dirs):
    eval_dir = make_eval_dir(tmp_path / "eval", steps=(0,))
    run_ppo_gold_eval.main([str(eval_dir), str(rm_dirs[2]), "--is-alpacafarm-rm"])
    ef = read_eval_file(list_eval_files(eval_dir)[0])
    texts = [alpacafarm_text(r.prompt, "", r.answer) for r in ef.rows]
    assert texts[0].startswith("Below is an instruction that describes a task. Write a response")
    assert "### Instruction:\nWrite a short story about a dragon.\n\n### Response:\nThe dragon" in texts[0]
    np.testing.assert_allclose([r.gold_score for r in ef.rows], direct(rm_dirs[2], texts), rtol=1e-5)
    assert ef.meta["gold_format"] == "alpacafarm"


def test_interrupted_run_resumes_where_it_stopped(tmp_path, rm_dirs, monkeypatch):
    eval_dir = make_eval_dir(tmp_path / "eval")
    seen = []
    original = RewardModelScorer.score_texts

    def flaky(self, texts):
        seen.append(list(texts))
        if len(seen) == 4:
            raise RuntimeError("killed")
        return original(self, texts)

    monkeypatch.setattr(RewardModelScorer, "score_texts", flaky)
    argv = [str(eval_dir), str(rm_dirs[1]), "--checkpoint-rows", "2"]
    with pytest.raises(RuntimeError):
        run_ppo_gold_eval.main(argv)
    first, second = (read_eval_file(p) for p in list_eval_files(eval_dir))
    assert all(r.gold_score is not None for r in first.rows)
    assert [r.gold_score is not None for r in second.rows] == [True, True, False]
    run_ppo_gold_eval.main(argv)
    assert len(seen) == 5 and len(seen[4]) == 1  # only the last row was left
    assert all(r.gold_score is not None for r in read_eval_file(list_eval_files(eval_dir)[1]).rows)


def test_other_gold_rm_needs_overwrite(tmp_path, rm_dirs):
    eval_dir = make_eval_dir(tmp_path / "eval", steps=(0,))
    run_ppo_gold_eval.main([str(eval_dir), str(rm_dirs[1])])
    with pytest.raises(DataError, match=r"eval_step000000.json: rows \[0, 1, 2\] already hold gold scores"):
        run_ppo_gold_eval.main([str(eval_dir), str(rm_dirs[2])])
    run_ppo_gold_eval.main([str(eval_dir), str(rm_dirs[2]), "--overwrite"])
    ef = read_eval_file(list_eval_files(eval_dir)[0])
    assert ef.meta["gold_rm"] == str(rm_dirs[2].resolve())


def test_bad_eval_dirs(tmp_path, rm_dirs):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no eval files"):
        run_ppo_gold_eval.main([str(tmp_path / "empty"), str(rm_dirs[1])])
    eval_dir = make_eval_dir(tmp_path / "eval", steps=(0,))
    path = list_eval_files(eval_dir)[0]
    data = json.loads(path.read_text())
    data["rows"][1]["proxy_score"] = "high"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="row 1: proxy_score must be a finite number"):
        run_ppo_gold_eval.main([str(eval_dir), str(rm_dirs[1])])
