import json

import numpy as np
import pytest

from reward_plugins import Sample, Status, parse_pipeline_config
from reward_plugins.ensemble import combine, standardize
from reward_plugins.pipeline import build_pipeline
from reward_plugins.reward_model import RewardModelConfig, RewardModelScorer

SAMPLES = [
    Sample(prompt="Write a story. ", response="The dragon learns to paint."),
    Sample(prompt="List fruit. ", response="apple, banana, cherry"),
    Sample(prompt="Q ", response="42"),
]


def ensemble(models_env, **fields):
    reward = {"type": "ensemble", "name": "ens", "path_template": f"{models_env}/rm_seed{{seed}}", "seeds": [1, 2, 3], **fields}
    return build_pipeline(parse_pipeline_config({"reward": reward}))


def member_matrix(models_env):
    texts = [s.prompt + s.response for s in SAMPLES]
    return np.stack([
        RewardModelScorer(RewardModelConfig.model_validate({"path": str(models_env / f"rm_seed{s}")})).score_texts(texts)[0]
        for s in (1, 2, 3)
    ])


@pytest.mark.parametrize("objective, weight", [("mean", 0.5), ("wco", 0.5), ("uwo", 0.5), ("uwo", 0.0)])
def test_objectives_match_members_scored_separately(models_env, objective, weight):
    out = ensemble(models_env, objective=objective, uwo_weight=weight).score(SAMPLES)
    members = member_matrix(models_env)
    np.testing.assert_allclose(out.rewards, combine(members, objective, weight), rtol=1e-5, atol=1e-5)
    first = out.results[0].components
    np.testing.assert_allclose([first["seed1"], first["seed2"], first["seed3"]], members[:, 0], rtol=1e-5, atol=1e-5)
    assert first["variance"] == pytest.approx(members[:, 0].var(), rel=1e-4)
    assert out.logs["reward/seed2"] == pytest.approx(members[1].mean(), rel=1e-4, abs=1e-5)


def test_member_list_with_names(models_env):
    reward = {"type": "ensemble", "objective": "wco", "members": [
        {"name": "big", "path": str(models_env / "rm_seed4")},
        {"name": "small", "path": str(models_env / "rm_seed5"), "max_length": 4},
    ]}
    pipe = build_pipeline(parse_pipeline_config({"reward": reward}))
    assert pipe.log_keys[3:] == ("reward/big", "reward/small", "reward/variance", "reward/combined")
    assert all(r.is_ok for r in pipe.score(SAMPLES).results)


def test_standardize_from_reference_set(models_env, tmp_path):
    reference = tmp_path / "ref.jsonl"
    rows = [{"prompt": f"prompt {i} ", "response": f"answer number {i} " * (i + 1)} for i in range(6)]
    reference.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = ensemble(models_env, objective="mean", standardize="reference_set", reference_set=str(reference)).score(SAMPLES)
    ref_texts = [r["prompt"] + r["response"] for r in rows]
    ref_scores = np.stack([
        RewardModelScorer(RewardModelConfig.model_validate({"path": str(models_env / f"rm_seed{s}")})).score_texts(ref_texts)[0]
        for s in (1, 2, 3)
    ])
    expected = standardize(member_matrix(models_env), ref_scores.mean(1), ref_scores.std(1)).mean(0)
    np.testing.assert_allclose(out.rewards, expected, rtol=1e-4, atol=1e-5)


def test_reference_set_errors_name_the_line(models_env, tmp_path):
    reference = tmp_path / "ref.jsonl"
    reference.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"ref.jsonl:2: expected an object with string prompt and response"):
        ensemble(models_env, standardize="reference_set", reference_set=str(reference))


def test_empty_response_is_an_error_not_a_score(models_env):
    pipe = build_pipeline(parse_pipeline_config({
        "on_error": "skip",
        "reward": {"type": "ensemble", "path_template": f"{models_env}/rm_seed{{seed}}", "seeds": [1, 2]},
    }))
    result = pipe.score([Sample(prompt="p", response=""), SAMPLES[0]])
    assert result.results[0].status is Status.ERROR and result.rewards[0] is None and result.results[1].is_ok
