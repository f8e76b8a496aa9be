"""Multi-head and LoRA ensembles in best-of-n (members cached and analysed as k RMs) and in gold evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation import eval_checkpoints, run_bon_pipeline, run_ppo_gold_eval
from evaluation.bon import bon_curve
from evaluation.eval_files import list_eval_files, read_eval_file
from evaluation.rm_text import rm_text
from reward_plugins import tiny_models
from reward_plugins.ensemble import combine
from reward_plugins.io import write_jsonl
from reward_plugins.lora_ensemble import LoraEnsembleScorer
from reward_plugins.multihead import MultiHeadScorer
from reward_plugins.reward_model import TextInputConfig

WORDS = "the quick brown fox jumps over lazy dog story dragon paint map storm ship harbour".split()


@pytest.fixture()
def gens(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"instruction": f"Write about item {p}.", "input": "", "gold_scores": rng.normal(size=6).round(3).tolist(),
             "answers": [" ".join(rng.choice(WORDS, size=rng.integers(2, 8))) + f" {p}.{a}" for a in range(6)]}
            for p in range(3)]
    write_jsonl(tmp_path / "gens.jsonl", rows)
    return tmp_path / "gens.jsonl", rows


@pytest.mark.parametrize("kind", ["multihead", "lora"])
def test_bon_treats_the_members_as_k_rms_and_scores_them_in_one_pass(kind, multihead_dir, lora_dir, gens, tmp_path,
                                                                      monkeypatch):
    folder, scorer_cls, prefix = ((multihead_dir, MultiHeadScorer, "head") if kind == "multihead"
                                  else (lora_dir, LoraEnsembleScorer, "adapter"))
    data, rows = gens
    out = tmp_path / "run"
    argv = [str(folder), "--ensembles", "--uwo-weights", "0.5", "--gold-gens", str(data), "-o", str(out),
            "--sample-ns", "1,2,4", "--big-n", "6", "--batch-size", "4"]
    built = []
    original = scorer_cls.__init__
    monkeypatch.setattr(scorer_cls, "__init__", lambda self, *a, **kw: built.append(1) or original(self, *a, **kw))
    curves = run_bon_pipeline.main(argv)
    names = [f"{prefix}{i}" for i in range(5)]
    assert set(curves) == {*names, "ensemble_mean", "ensemble_WCO", "ensemble_UWO-0.5"}
    assert built == [1], "one model scores all k members"
    texts = [[rm_text(r["instruction"], r["input"], a) for a in r["answers"]] for r in rows]
    scorer = scorer_cls(TextInputConfig(path=str(folder), max_length=776, device="cpu"))
    direct = [scorer.member_scores_texts(t)[0] for t in texts]  # per prompt: (5, answers)
    gold = [np.array(r["gold_scores"]) for r in rows]
    for m, name in enumerate(names):
        expected = bon_curve([d[m] for d in direct], gold, [1, 2, 4])
        for got, want in zip(curves[name], expected):
            assert got["gold_score"] == pytest.approx(want["gold_score"]) and got["proxy_score"] == pytest.approx(want["proxy_score"], rel=1e-5)
        meta = json.loads((out / name / "bon_meta.json").read_text())
        assert meta["member"] == name and meta["kind"] == kind and meta["proxy_rm"] == str(folder)
    uwo = bon_curve([combine(d, "uwo", 0.5) for d in direct], gold, [1, 2, 4])
    assert [c["gold_score"] for c in curves["ensemble_UWO-0.5"]] == pytest.approx([c["gold_score"] for c in uwo])
    caches = sorted(p.name.rsplit("-", 1)[0] for p in (out / "scores").iterdir())
    assert caches == names, "each member has its own cache folder, like a separate RM"
    assert json.loads(next((out / "scores").glob(f"{prefix}3-*")).joinpath("meta.json").read_text())["settings"]["member"] == 3
    built.clear()
    again = run_bon_pipeline.main(argv)
    assert built == [] and again == curves, "a rerun reads every member from the cache without loading the model"


def test_bon_refuses_seeds_with_a_one_model_ensemble(multihead_dir, gens, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_bon_pipeline.main([str(multihead_dir), "--seeds", "1,2", "--gold-gens", str(gens[0]), "-o", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "is a multihead ensemble: its members are the RMs, so --seeds does not apply" in capsys.readouterr().err


def test_eval_files_keep_the_heads_and_gold_evaluation_adds_gold(models_env, lm_dir, tokenizer_dir, rm_dirs, tmp_path):
    checkpoint = tiny_models.build_causal_lm(tmp_path / "global_step10", tokenizer_dir, seed=3)
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "Write a short story about a dragon"}, {"prompt": "List three fruits."}])
    out = tmp_path / "eval"
    eval_checkpoints.main(["--checkpoints", str(checkpoint), "--initial-policy", str(lm_dir), "--prompts", str(prompts),
                           "--reward-config", "configs/rewards/multihead_uwo5.yaml", "-o", str(out), "--no-initial",
                           "--max-new-tokens", "6"])
    (only,) = list_eval_files(out)
    rows = read_eval_file(only).rows
    scored = [row for row in rows if row.proxy_score != -1.0]
    assert scored
    for row in scored:
        heads = [row.components[f"head{h}"] for h in range(5)]
        assert row.ensemble_variance == pytest.approx(np.var(heads))
        assert row.proxy_score == pytest.approx(np.mean(heads) - 0.1 * np.var(heads))
    run_ppo_gold_eval.main([str(out), str(rm_dirs[5]), "--template", "{prompt}{response}"])
    assert all(row.gold_score is not None for row in read_eval_file(only).rows)
