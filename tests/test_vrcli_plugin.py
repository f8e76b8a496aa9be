import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from reward_plugins import Sample, Status
from reward_plugins.logprobs import HFLogProbScorer, perplexity
from reward_plugins.vrcli import VRCLIConfig, VRCLIPlugin, VRCLIPrompt, baseline_perplexities, improvement, shape

LABELS = [
    {"context": "Write the next chapter about the dragon.", "gold": "She opened the door and smiled at the sea."},
    {"context": "The storm hits the harbour.", "gold": "Chapter two begins with a ship in trouble."},
    {"context": "A short story.", "gold": "The quick brown fox jumps over the lazy dog. " * 4},
]


@pytest.fixture(scope="module")
def scorer(lm_dir):
    return HFLogProbScorer(str(lm_dir), batch_size=2)


def reference_ppl(lm_dir, context_ids, gold_ids, temperature=1.0):
    """Perplexity from the model's own loss with context tokens masked out: independent of our code."""
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    ids = torch.tensor([context_ids + gold_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(context_ids) - 1 : -1] / temperature
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(gold_ids))
    return math.exp(nll.item())


def test_scorer_matches_model_loss(scorer, lm_dir):
    prompt = VRCLIPrompt()
    for label in LABELS:
        ctx, gold = prompt.token_ids(scorer.tokenizer, label, "the hero leaves")
        ours = perplexity(scorer.continuation_logprobs([ctx], [gold])[0])
        assert ours == pytest.approx(reference_ppl(lm_dir, ctx, gold), rel=1e-5)


def test_batched_equals_single_and_temperature(lm_dir):
    prompt = VRCLIPrompt()
    warm = HFLogProbScorer(str(lm_dir), batch_size=3, temperature=0.7)
    pairs = [prompt.token_ids(warm.tokenizer, label, None) for label in LABELS]
    batched = warm.continuation_logprobs([c for c, _ in pairs], [g for _, g in pairs])
    for (ctx, gold), row in zip(pairs, batched):
        np.testing.assert_allclose(row, warm.continuation_logprobs([ctx], [gold])[0], rtol=1e-5, atol=1e-6)
        assert perplexity(row) == pytest.approx(reference_ppl(lm_dir, ctx, gold, temperature=0.7), rel=1e-5)


def test_plan_and_baseline_share_gold_tokens(scorer):
    prompt = VRCLIPrompt()
    ctx_base, gold_base = prompt.token_ids(scorer.tokenizer, LABELS[0], None)
    ctx_plan, gold_plan = prompt.token_ids(scorer.tokenizer, LABELS[0], "a plan")
    assert gold_base == gold_plan
    assert len(ctx_plan) > len(ctx_base)


def plugin_for(lm_dir, **overrides) -> VRCLIPlugin:
    config = VRCLIConfig.model_validate({"scorer": {"model": str(lm_dir), "batch_size": 2}, **overrides})
    return VRCLIPlugin(config, "vrcli")


def test_reward_end_to_end(lm_dir, scorer):
    plugin = plugin_for(lm_dir)
    baselines = baseline_perplexities(plugin.scorer, plugin.config.prompt, LABELS)
    labels = [{**label, "baseline_ppl": float(b), "baseline_temperature": 1.0} for label, b in zip(LABELS, baselines)]
    samples = [Sample(prompt="p", response=f"thinking. In summary: plan number {i}<eos>", label=label) for i, label in enumerate(labels)]
    results = plugin.score(samples)
    assert all(r.status is Status.OK for r in results)
    for sample, result, baseline in zip(samples, results, baselines):
        ctx, gold = plugin.config.prompt.token_ids(scorer.tokenizer, sample.label, sample.response.split("In summary:")[-1].removesuffix("<eos>").strip())
        ppl = perplexity(scorer.continuation_logprobs([ctx], [gold])[0])
        expected = improvement([baseline], [ppl])[0]
        assert result.components["improvement"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert result.reward == shape([expected], "stepped")[0]
        assert result.components["baseline_ppl"] == pytest.approx(baseline)


def test_bad_samples_get_errors_and_batch_survives(lm_dir):
    plugin = plugin_for(lm_dir, shaping={"scheme": "raw"})
    good_label = {**LABELS[0], "baseline_ppl": 50.0}
    samples = [
        Sample(prompt="p", response="In summary: fine", label=good_label),
        Sample(prompt="p", response="", label=good_label),
        Sample(prompt="p", response="no marker", label=good_label),
        Sample(prompt="p", response="In summary: x", label={**LABELS[0]}),
        Sample(prompt="p", response="In summary: x", label={**good_label, "baseline_temperature": 0.6}),
        Sample(prompt="p", response="In summary: x", label="just a string"),
        Sample(prompt="p", response="In summary: x", label={"gold": "g", "baseline_ppl": 3.0}),
    ]
    results = plugin.score(samples)
    assert results[0].status is Status.OK
    messages = [r.error for r in results[1:]]
    assert all(r.status is Status.ERROR for r in results[1:])
    assert "no plan marker" in messages[0] and "no plan marker" in messages[1]
    assert "baseline_ppl" in messages[2]
    assert "temperature" in messages[3]
    assert "label must be an object" in messages[4]
    assert "context" in messages[5]


def test_external_backend_needs_a_scorer(lm_dir, scorer):
    config = VRCLIConfig.model_validate({"scorer": {"backend": "external"}})
    plugin = VRCLIPlugin(config, "vrcli")
    sample = Sample(prompt="p", response="In summary: x", label={**LABELS[0], "baseline_ppl": 10.0})
    with pytest.raises(RuntimeError, match="no scorer was attached"):
        plugin.score([sample])
    plugin.attach_scorer(scorer)
    assert plugin.score([sample])[0].is_ok


def test_in_memory_model_scores_like_the_loaded_one(scorer):
    wrapped = HFLogProbScorer.from_model(scorer.model, scorer.tokenizer, batch_size=3)
    pairs = [VRCLIPrompt().token_ids(scorer.tokenizer, label, None) for label in LABELS]
    contexts, golds = [c for c, _ in pairs], [g for _, g in pairs]
    for ours, theirs in zip(wrapped.continuation_logprobs(contexts, golds), scorer.continuation_logprobs(contexts, golds)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
