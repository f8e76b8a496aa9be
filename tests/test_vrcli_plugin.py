import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from reward_plugins import Sample, Status
from reward_plugins.logprobs import HFLogProbScorer, perplexity
from reward_plugins.vrcli import VRCLIConfig, VRCLIPlugin, VRCLIPrompt, baseline_perplexities
from vrcli_reference import messages_for, whole_string_ppl

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


def stepped(improvement: float) -> float:
    """The paper's shaping, written out: 0 / 0.5 / 0.9 / 1.0 from 0.05 / 1 / 2 percent."""
    return 1.0 if improvement >= 2 else 0.9 if improvement >= 1 else 0.5 if improvement >= 0.05 else 0.0


def test_reward_end_to_end(lm_dir):
    """Rewards from the plugin against the original's whole-string computation with transformers' own loss."""
    plugin = plugin_for(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    tokenizer = plugin.scorer.tokenizer
    system = plugin.config.prompt.system
    plans = ["the hero leaves", "a storm. then calm", "the fox runs to the sea"]
    baselines = [whole_string_ppl(model, tokenizer, messages_for(system, label["context"]), label["gold"]) for label in LABELS]
    labels = [{**label, "baseline_ppl": b, "baseline_temperature": 1.0} for label, b in zip(LABELS, baselines)]
    samples = [Sample(prompt="p", response=f"thinking. In summary: {plan}<eos>", label=label)
               for plan, label in zip(plans, labels)]
    results = plugin.score(samples)
    assert all(r.status is Status.OK for r in results)
    for plan, label, result, baseline in zip(plans, LABELS, results, baselines):
        user = f"{label['context']}\n\n### Detailed Plan for the Next Chapter ###\n{plan}"
        ppl = whole_string_ppl(model, tokenizer, messages_for(system, user), label["gold"])
        expected = 100 * (baseline - ppl) / baseline
        assert result.components["ppl"] == pytest.approx(ppl, rel=1e-5)
        assert result.components["improvement"] == pytest.approx(expected, abs=1e-3)  # percent points; float32 model
        assert result.reward == stepped(result.components["improvement"])
        assert result.components["baseline_ppl"] == pytest.approx(baseline)
    assert baseline_perplexities(plugin.scorer, plugin.config.prompt, LABELS) == pytest.approx(baselines, rel=1e-5)


def test_bad_samples_get_errors_and_batch_survives(lm_dir):
    plugin = plugin_for(lm_dir, shaping={"scheme": "raw"})
    good_label = {**LABELS[0], "baseline_ppl": 50.0}
    samples = [
        Sample(prompt="p", response="In summary: fine", label=good_label),
        Sample(prompt="p", response="no marker", label=good_label),
        Sample(prompt="p", response="", label=good_label),
        Sample(prompt="p", response="In summary: x", label={**LABELS[0]}),
        Sample(prompt="p", response="In summary: x", label={**good_label, "baseline_temperature": 0.6}),
        Sample(prompt="p", response="In summary: x", label="just a string"),
        Sample(prompt="p", response="In summary: x", label={"gold": "g", "baseline_ppl": 3.0}),
        Sample(prompt="p", response="In summary: x", label={**good_label, "baseline_ppl": True}),
    ]
    results = plugin.score(samples)
    assert results[0].status is Status.OK and results[0].components["vrcli_no_plan"] == 0.0
    assert results[1].status is Status.OK and results[1].components["vrcli_no_plan"] == 1.0  # the paper's fallback
    messages = [r.error for r in results[2:]]
    assert all(r.status is Status.ERROR for r in results[2:])
    assert "empty plan" in messages[0]
    assert "baseline_ppl" in messages[1]
    assert "temperature" in messages[2]
    assert "label must be an object" in messages[3]
    assert "context" in messages[4]
    assert "baseline_ppl" in messages[5]
    strict = plugin_for(lm_dir, plan={"whole_response_fallback": False})
    assert "no plan marker" in strict.score([samples[1]])[0].error


def test_no_plan_share_is_logged(lm_dir):
    from reward_plugins.pipeline import RewardPipeline

    plugin = plugin_for(lm_dir)
    label = {**LABELS[0], "baseline_ppl": 50.0}
    batch = RewardPipeline(plugin, "raise").score(
        [Sample(prompt="p", response=r, label=label) for r in ("In summary: go", "prose only", "more prose", "x In summary, y")])
    assert batch.logs["reward/vrcli_no_plan"] == 0.5 and batch.logs["reward/errors"] == 0
    assert batch.logs["reward/vrcli_truncated"] == 0.0


def test_long_story_is_cut_identically_and_the_gold_never(scorer):
    """Expected ids from transformers' whole-string chat tokenization: the gold (with the template's closing
    tokens) is never cut, every input keeps the same newest story tokens, and a long plan keeps its start."""
    prompt = VRCLIPrompt(plan_token_reserve=8)
    story = " ".join(f"The fox walked to the river on day {i} ." for i in range(40))
    label = {"context": story, "gold": "She opened the door and smiled at the sea."}
    tok = scorer.tokenizer
    system = prompt.system

    def whole(user):
        messages = messages_for(system, user)
        ids = tok.apply_chat_template([*messages, {"role": "assistant", "content": label["gold"]}], tokenize=True)["input_ids"]
        return list(ids), len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])

    plan_text = lambda plan: f"{story}\n\n### Detailed Plan for the Next Chapter ###\n{plan}"  # noqa: E731
    base_ids, base_prefix = whole(story)
    empty_ids, _ = whole(plan_text(""))
    gold = base_ids[base_prefix:]
    story_ids = tok(story, add_special_tokens=False)["input_ids"]
    assert gold[-1] == tok.eos_token_id  # the template's end of turn is scored, as in the original
    fixed = max(len(base_ids), len(empty_ids)) - len(story_ids) - len(gold)
    max_length = 120
    budget = max_length - len(gold) - fixed - 8
    assert 0 < budget < len(story_ids)
    untouched = prompt.scored_input(tok, label, None, None)
    assert untouched.context + untouched.gold == base_ids and untouched.gold == gold
    base = prompt.scored_input(tok, label, None, max_length)
    short = prompt.scored_input(tok, label, "go to the sea", max_length)
    long_plan = " ".join(["the fox runs"] * 30)
    cut = prompt.scored_input(tok, label, long_plan, max_length)
    kept = story_ids[-budget:]
    for scored in (base, short, cut):
        assert scored.gold == gold and scored.story_cut
        assert len(scored.context) + len(scored.gold) <= max_length
        window = [scored.context[i : i + budget + 1] for i in range(len(scored.context) - budget)]
        assert [story_ids[-budget - 1], *kept] not in window  # the older tokens are gone
        assert any(w[1:] == kept for w in window)  # the same newest story tokens in every input
    assert len(base.context) + len(gold) < max_length and not short.plan_cut
    assert cut.plan_cut and len(cut.context) + len(gold) == max_length
    plan_ids = tok(long_plan, add_special_tokens=False)["input_ids"]
    full_cut_ids, _ = whole(plan_text(long_plan))
    keep_plan = len(plan_ids) - (len(full_cut_ids) - (len(story_ids) - budget) - max_length)
    closing = [tok.eos_token_id, tok.convert_tokens_to_ids("<|assistant|>")]  # end of the user turn, assistant header
    assert cut.context[-len(closing):] == closing and 0 < keep_plan < len(plan_ids)
    assert cut.context[-len(closing) - keep_plan : -len(closing)] == plan_ids[:keep_plan]  # the plan's start is kept
    assert prompt.scored_input(tok, label, None, 10_000).context == untouched.context


def test_truncation_is_counted(lm_dir):
    from reward_plugins.pipeline import RewardPipeline

    plugin = plugin_for(lm_dir, prompt={"plan_token_reserve": 8})
    plugin.scorer.max_length = 120
    long_label = {"context": " ".join(["The fox walked to the river ."] * 40), "gold": "She smiled."}
    labels = [long_label, LABELS[1]]
    baselines = baseline_perplexities(plugin.scorer, plugin.config.prompt, labels)
    samples = [Sample(prompt="p", response="In summary: the fox swims", label={**label, "baseline_ppl": float(b)})
               for label, b in zip(labels, baselines)]
    batch = RewardPipeline(plugin, "raise").score(samples)
    assert [r.components["vrcli_truncated"] for r in batch.results] == [1.0, 0.0]
    assert batch.logs["reward/vrcli_truncated"] == 0.5


def test_fingerprint_mismatch_is_refused(lm_dir):
    from reward_plugins.registry import check_baselines
    from reward_plugins.vrcli import BaselineMismatchError, fingerprint

    plugin = plugin_for(lm_dir)
    own = plugin.fingerprint()
    assert own == {"model": "ref_lm", "temperature": 1.0, "max_length": 4096,
                   "prompt_hash": VRCLIPrompt().settings_hash(), "dtype": "float32", "attn_implementation": "sdpa"}
    assert VRCLIPrompt(layout="paper").settings_hash() != own["prompt_hash"]
    good = {**LABELS[0], "id": "a", "baseline_ppl": 50.0, "baseline_fingerprint": dict(own)}
    check_baselines(plugin, [good])
    assert plugin.score([Sample(prompt="p", response="In summary: x", label=good)])[0].is_ok
    for change in ({"model": "other_lm"}, {"temperature": 0.7}, {"max_length": 16384}, {"prompt_hash": "0" * 16},
                   {"dtype": "bfloat16"}, {"attn_implementation": "flash_attention_2"}):
        bad = {**good, "id": "b", "baseline_fingerprint": {**own, **change}}
        key = next(iter(change))
        with pytest.raises(BaselineMismatchError, match=key):
            check_baselines(plugin, [good, bad])
        result = plugin.score([Sample(prompt="p", response="In summary: x", label=bad)])[0]
        assert result.status is Status.ERROR and key in result.error
    unmarked = {**LABELS[0], "baseline_ppl": 50.0}
    check_baselines(plugin, [unmarked])  # fingerprint: check accepts hand-made labels
    strict = plugin_for(lm_dir, fingerprint="require")
    with pytest.raises(BaselineMismatchError, match="no 'baseline_fingerprint'"):
        check_baselines(strict, [unmarked])
    assert strict.score([Sample(prompt="p", response="In summary: x", label=unmarked)])[0].status is Status.ERROR
    assert fingerprint("m", 1, 8, VRCLIPrompt(), "bf16", "eager") == {
        "model": "m", "temperature": 1.0, "max_length": 8, "prompt_hash": VRCLIPrompt().settings_hash(),
        "dtype": "bfloat16", "attn_implementation": "eager"}
    old_label = {**good, "id": "c", "baseline_fingerprint": {k: own[k] for k in ("model", "temperature", "max_length",
                                                                               "prompt_hash")}}
    with pytest.raises(BaselineMismatchError, match="dtype: baseline None, reward 'float32'"):
        check_baselines(plugin, [old_label])  # baselines from before dtype was recorded: recompute


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
