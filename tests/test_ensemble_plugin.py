"""The `ensemble` plugin end to end on tiny RMs. Expected values never come from the code under test: each member's
score is the model's own logit on one unpadded text (plain transformers), and mean / min / variance / z-scores are
written out in plain Python below."""

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward_plugins import ConfigError, Sample, Status, load_pipeline_config, parse_pipeline_config
from reward_plugins.pipeline import build_pipeline

SAMPLES = [
    Sample(prompt="Write a story. ", response="The dragon learns to paint."),
    Sample(prompt="List fruit. ", response="apple, banana, cherry"),
    Sample(prompt="Q ", response="42"),
]


def ensemble(models_env, seeds=(1, 2, 3), **fields):
    reward = {"type": "ensemble", "name": "ens", "path_template": f"{models_env}/rm_seed{{seed}}", "seeds": list(seeds),
              **fields}
    return build_pipeline(parse_pipeline_config({"reward": reward}))


@torch.no_grad()
def logit(folder, text: str) -> float:
    """The RM's score of one text, unbatched: tokenizer with special tokens, no padding, logits[0, 0]."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    return float(model(**tokenizer(text, return_tensors="pt")).logits[0, 0])


def member_rows(models_env, seeds, texts) -> list[list[float]]:
    return [[logit(models_env / f"rm_seed{s}", t) for t in texts] for s in seeds]


def mean(xs):
    return sum(xs) / len(xs)


def variance(xs, ddof=0):
    m = mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - ddof)


def by_hand(column, objective, weight, ddof):
    if objective == "mean":
        return mean(column)
    if objective == "wco":
        return min(column)
    return mean(column) - weight * variance(column, ddof)


@pytest.mark.parametrize("objective, weight, ddof", [("mean", 0.5, 0), ("wco", 0.5, 0), ("uwo", 0.5, 0), ("uwo", 0.0, 0),
                                                     ("uwo", 2.0, 1)])
def test_objectives_match_members_scored_one_by_one(models_env, objective, weight, ddof):
    out = ensemble(models_env, objective=objective, uwo_weight=weight, ddof=ddof).score(SAMPLES)
    rows = member_rows(models_env, (1, 2, 3), [s.prompt + s.response for s in SAMPLES])
    columns = [[row[i] for row in rows] for i in range(len(SAMPLES))]
    assert len({round(c[0] - c[1], 6) for c in columns}) == len(SAMPLES)  # members disagree, so objectives differ
    assert out.rewards == pytest.approx([by_hand(c, objective, weight, ddof) for c in columns], rel=2e-5, abs=1e-5)
    for result, column in zip(out.results, columns):
        c = result.components
        assert [c["seed1"], c["seed2"], c["seed3"]] == pytest.approx(column, rel=2e-5, abs=1e-5)
        assert c["variance"] == pytest.approx(variance(column, ddof), rel=2e-5, abs=1e-5)
        assert c["combined"] == pytest.approx(by_hand(column, objective, weight, ddof), rel=2e-5, abs=1e-5)
    assert out.logs["reward/seed2"] == pytest.approx(mean(rows[1]), rel=2e-5, abs=1e-5)
    assert out.logs["reward/variance"] == pytest.approx(mean([variance(c, ddof) for c in columns]), rel=2e-5, abs=1e-5)


def test_uwo_penalises_disagreement_by_its_weight(models_env):
    """The same batch: uwo at weight w is the mean minus w times the population variance, so two weights differ by
    exactly their difference times the variance."""
    low = ensemble(models_env, objective="uwo", uwo_weight=0.1).score(SAMPLES)
    high = ensemble(models_env, objective="uwo", uwo_weight=3.0).score(SAMPLES)
    for a, b, result in zip(low.rewards, high.rewards, low.results):
        assert a - b == pytest.approx(2.9 * result.components["variance"], rel=2e-5, abs=1e-6)
        assert result.components["variance"] > 0


def test_member_list_with_names_and_own_settings(models_env):
    reward = {"type": "ensemble", "objective": "wco", "members": [
        {"name": "big", "path": str(models_env / "rm_seed4")},
        {"name": "small", "path": str(models_env / "rm_seed5"), "template": "{response}"},
    ]}
    pipe = build_pipeline(parse_pipeline_config({"reward": reward}))
    assert pipe.log_keys[3:] == ("reward/big", "reward/small", "reward/variance", "reward/combined")
    out = pipe.score(SAMPLES)
    for sample, result, reward_value in zip(SAMPLES, out.results, out.rewards):
        big = logit(models_env / "rm_seed4", sample.prompt + sample.response)
        small = logit(models_env / "rm_seed5", sample.response)
        assert (result.components["big"], result.components["small"]) == pytest.approx((big, small), rel=2e-5, abs=1e-5)
        assert reward_value == pytest.approx(min(big, small), rel=2e-5, abs=1e-5)


def test_standardize_from_reference_set(models_env, tmp_path):
    reference = tmp_path / "ref.jsonl"
    rows = [{"prompt": f"prompt {i} ", "response": f"answer number {i} " * (i + 1)} for i in range(6)]
    reference.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = ensemble(models_env, objective="mean", standardize="reference_set", reference_set=str(reference)).score(SAMPLES)
    ref = member_rows(models_env, (1, 2, 3), [r["prompt"] + r["response"] for r in rows])
    stats = [(mean(r), math.sqrt(variance(r))) for r in ref]  # population std, as the plugin documents
    raw = member_rows(models_env, (1, 2, 3), [s.prompt + s.response for s in SAMPLES])
    for i, result in enumerate(out.results):
        z = [(raw[m][i] - stats[m][0]) / stats[m][1] for m in range(3)]
        assert out.rewards[i] == pytest.approx(mean(z), rel=2e-5, abs=1e-4)
        assert result.components["seed1"] == pytest.approx(raw[0][i], rel=2e-5, abs=1e-5)  # members logged raw
        assert result.components["variance"] == pytest.approx(variance(z), rel=2e-5, abs=1e-4)  # variance of what is combined


def test_standardize_from_given_stats(models_env):
    stats = [{"mean": 0.5, "std": 2.0}, {"mean": -1.0, "std": 0.5}]
    out = ensemble(models_env, seeds=(1, 2), objective="wco", standardize="reference_stats",
                   reference_stats=stats).score(SAMPLES)
    raw = member_rows(models_env, (1, 2), [s.prompt + s.response for s in SAMPLES])
    for i, value in enumerate(out.rewards):
        assert value == pytest.approx(min((raw[0][i] - 0.5) / 2.0, (raw[1][i] + 1.0) / 0.5), rel=2e-5, abs=1e-5)


def test_reference_set_errors_name_the_line(models_env, tmp_path):
    reference = tmp_path / "ref.jsonl"
    reference.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"ref.jsonl:2: expected an object with string prompt and response"):
        ensemble(models_env, standardize="reference_set", reference_set=str(reference))
    reference.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(ValueError, match="a reference set needs at least 2 samples"):
        ensemble(models_env, standardize="reference_set", reference_set=str(reference))


def test_identical_reference_scores_are_refused(models_env, tmp_path):
    reference = tmp_path / "ref.jsonl"
    reference.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"}\n')
    with pytest.raises(ValueError, match="zero or non-finite spread"):
        ensemble(models_env, standardize="reference_set", reference_set=str(reference))


def test_empty_response_is_an_error_not_a_score(models_env):
    pipe = build_pipeline(parse_pipeline_config({
        "on_error": "skip",
        "reward": {"type": "ensemble", "path_template": f"{models_env}/rm_seed{{seed}}", "seeds": [1, 2]},
    }))
    result = pipe.score([Sample(prompt="p", response=""), SAMPLES[0]])
    assert result.results[0].status is Status.ERROR and result.rewards[0] is None and result.results[1].is_ok
    assert "ensemble: empty response" in result.results[0].error


@pytest.mark.parametrize("objective", ["mean", "wco", "uwo"])
def test_one_member_with_ddof_1_is_refused_at_load(models_env, tmp_path, objective):
    """One member has no sample variance: refused when the file is read, whatever the objective, never logged as 0."""
    path = tmp_path / "one.yaml"
    path.write_text(f"reward:\n  type: ensemble\n  objective: {objective}\n  ddof: 1\n"
                    f"  path_template: {models_env}/rm_seed{{seed}}\n  seeds: [1]\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(path)
    assert info.value.problems == [f"{path}:1: reward: ddof=1 needs more than 1 member(s) for a variance; "
                                   "this ensemble has 1"]
    path.write_text(path.read_text().replace("seeds: [1]", "seeds: [1, 2]"))
    assert load_pipeline_config(path).reward.config.ddof == 1


def test_one_member_population_variance_is_zero(models_env):
    out = ensemble(models_env, seeds=(3,), objective="uwo", uwo_weight=5.0).score(SAMPLES[:1])
    score = logit(models_env / "rm_seed3", SAMPLES[0].prompt + SAMPLES[0].response)
    assert out.rewards == pytest.approx([score], rel=2e-5, abs=1e-5) and out.results[0].components["variance"] == 0.0
