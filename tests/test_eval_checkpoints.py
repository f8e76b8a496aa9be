"""`python -m evaluation.eval_checkpoints` on tiny causal LMs: sampled answers, reward scores, KL, resumption, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from evaluation import eval_checkpoints
from evaluation.eval_files import list_eval_files, read_eval_file
from reward_plugins import tiny_models
from reward_plugins.io import DataError, write_jsonl
from reward_plugins.pipeline import RewardPipeline
from reward_plugins.types import Sample

CONFIG = "configs/rewards/reward_model.yaml"




@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("ckpt")
    return [tiny_models.build_causal_lm(root / f"global_step{step}", tokenizer_dir, seed=seed) for step, seed in ((20, 7), (10, 3))]


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, [
        {"prompt": "Write a short story about a dragon", "label": {"id": 1}},
        {"prompt": [{"role": "user", "content": "List three fruits."}]},
        {"instruction": "Answer the question politely", "input": "why is the sea blue"},
    ])
    return path


def manual_logprob(model, context, answer):
    ids = torch.tensor([context + answer])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(context) + t - 1, tok]) for t, tok in enumerate(answer))


def test_eval_files_for_checkpoints(tmp_path, models_env, lm_dir, tokenizer_dir, checkpoints, prompts, monkeypatch):
    out = tmp_path / "eval"
    argv = ["--checkpoints", *map(str, checkpoints), "--initial-policy", str(lm_dir), "--prompts", str(prompts),
            "--reward-config", CONFIG, "-o", str(out), "--max-new-tokens", "6", "--samples-per-prompt", "2",
            "--batch-size", "4"]
    written = eval_checkpoints.main(argv)
    assert [p.name for p in written] == ["eval_step000000.json", "eval_step000010.json", "eval_step000020.json"]
    files = [read_eval_file(p) for p in list_eval_files(out)]
    assert [f.step for f in files] == [0, 10, 20]
    assert files[0].kl == 0.0 and all(r.kl == 0.0 for r in files[0].rows)
    assert files[2].kl_history == [0.0, files[1].kl, files[2].kl]
    step10 = files[1]
    assert len(step10.rows) == 6 and step10.rows[2].prompt == step10.rows[3].prompt == "<|user|>List three fruits.<eos><|assistant|>"
    assert step10.rows[4].prompt == "Answer the question politely\nwhy is the sea blue"
    assert step10.kl == pytest.approx(np.mean([r.kl for r in step10.rows]))
    # Rewards are the pipeline's scores of (prompt, answer).
    pipeline = RewardPipeline.from_yaml(CONFIG)
    again = pipeline.score([Sample(prompt=r.prompt, response=r.answer) for r in step10.rows])
    for row, reward in zip(step10.rows, again.rewards):
        assert (row.proxy_score is None) == (reward is None) and row.proxy_score == pytest.approx(reward, rel=1e-5)
    assert "score" in step10.rows[0].components or step10.rows[0].proxy_score == -1.0
    # KL: the sum over the answer tokens of log pi - log pi_init, recomputed by hand for every row.
    from argparse import Namespace

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir)
    contexts = [tok(r.prompt, add_special_tokens=False)["input_ids"] for r in step10.rows]
    torch.manual_seed(0)
    settings = Namespace(batch_size=4, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6)
    policy = AutoModelForCausalLM.from_pretrained(checkpoints[1]).eval()
    initial = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    answer_ids = eval_checkpoints.sample_answers(policy, tok, contexts, settings)
    assert [tok.decode(ids, skip_special_tokens=True) for ids in answer_ids] == [r.answer for r in step10.rows]
    for row, context, answer in zip(step10.rows, contexts, answer_ids):
        expected = manual_logprob(policy, context, answer) - manual_logprob(initial, context, answer)
        assert row.kl == pytest.approx(expected, abs=1e-4)
    assert any(abs(r.kl) > 1e-3 for r in step10.rows)
    # Same seed, same answers; finished steps are skipped without loading a model.
    before = {p.name: p.read_bytes() for p in list_eval_files(out)}
    monkeypatch.setattr(eval_checkpoints, "sample_answers", lambda *a, **k: pytest.fail("must not sample again"))
    assert eval_checkpoints.main(argv) == []
    assert {p.name: p.read_bytes() for p in list_eval_files(out)} == before
    (out / "eval_step000020.json").unlink()
    monkeypatch.undo()
    monkeypatch.setenv("MODELS_DIR", str(models_env))
    eval_checkpoints.main(argv)
    redone = read_eval_file(out / "eval_step000020.json")
    assert [r.answer for r in redone.rows] == [r.answer for r in files[2].rows]
    assert redone.kl_history == files[2].kl_history


def test_ensemble_members_and_variance_are_kept(tmp_path, models_env, lm_dir, checkpoints, prompts):
    out = tmp_path / "eval"
    eval_checkpoints.main(["--checkpoints", str(checkpoints[0]), "--initial-policy", str(lm_dir), "--prompts", str(prompts),
                           "--reward-config", "configs/rewards/ensemble_uwo5.yaml", "-o", str(out), "--no-initial",
                           "--max-new-tokens", "4", "--max-prompts", "2"])
    (only,) = list_eval_files(out)
    ef = read_eval_file(only)
    assert ef.step == 20 and len(ef.rows) == 2 and ef.kl_history == [ef.kl]
    assert any(row.proxy_score != -1.0 for row in ef.rows)
    for row in ef.rows:
        if row.proxy_score != -1.0:  # an empty answer is an error, scored with the config's penalty
            members = [row.components[f"seed{s}"] for s in range(1, 6)]
            assert row.ensemble_variance == pytest.approx(np.var(members))
            assert row.proxy_score == pytest.approx(np.mean(members) - 0.1 * np.var(members))


def test_bad_prompts_and_steps(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, [{"prompt": "ok"}, {"text": "no prompt here"}])
    with pytest.raises(DataError, match=r"prompts.jsonl:2: needs a non-empty `prompt`"):
        eval_checkpoints.load_prompts(path)
    write_jsonl(path, [])
    with pytest.raises(DataError, match="no prompts"):
        eval_checkpoints.load_prompts(path)
    assert eval_checkpoints.checkpoint_steps(["a/global_step200", "a/global_step30"]) == [(30, "a/global_step30"), (200, "a/global_step200")]
    assert eval_checkpoints.checkpoint_steps(["x/final", "x/best"]) == [(1, "x/final"), (2, "x/best")]
    with pytest.raises(ValueError, match="repeated steps"):
        eval_checkpoints.checkpoint_steps(["a/step_1", "b/step_1"])
