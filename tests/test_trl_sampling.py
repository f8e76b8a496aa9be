"""TRL's GRPO / RLOO training sampler follows the policy: a checkpoint whose generation_config sets
repetition_penalty, min_new_tokens and no_repeat_ngram_size does not change what is sampled, and the saved
checkpoints and final model keep that generation_config. Expected log-probs come from a plain forward pass."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from reward_plugins.io import write_jsonl
from trl_ext import train

OPINIONS = {"repetition_penalty": 1.3, "min_new_tokens": 6, "no_repeat_ngram_size": 2}


@pytest.fixture(scope="module")
def opinionated_lm(tmp_path_factory, lm_dir):
    """The tiny LM saved with a generation config that would change sampling if it applied."""
    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    for key, value in OPINIONS.items():
        setattr(model.generation_config, key, value)
    out = tmp_path_factory.mktemp("opinionated")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(lm_dir).save_pretrained(out)
    return out


def _spy_on_generate(model, calls: list):
    """Record every `generate` call's sequences and the scores each token was drawn from (TRL gets the sequences)."""
    original = model.generate

    def generate(*args, generation_config: GenerationConfig, **kwargs):
        config = copy.deepcopy(generation_config)
        config.output_scores = config.return_dict_in_generate = True
        out = original(*args, generation_config=config, **kwargs)
        calls.append((kwargs["input_ids"].shape[1], out.sequences, torch.stack(out.scores, 1)))
        return out.sequences

    model.generate = generate


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_training_samples_follow_softmax_at_temperature_and_saved_configs_are_kept(tmp_path, opinionated_lm,
                                                                                  algorithm):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": p, "label": {}} for p in ("The fox", "a b a b a b", "In summary: the hero")])
    reward = tmp_path / "r.yaml"
    reward.write_text(yaml.safe_dump({"reward": {"type": "length_penalty", "name": "len", "coef": 0.01}}))
    temperature, out = 0.8, tmp_path / algorithm
    cfg = train.parse_args([
        "--set", f"algorithm={algorithm}", "--set", f"policy={opinionated_lm}", "--set", f"reward_config={reward}",
        "--set", f"train_data={prompts}", "--set", f"output_dir={out}", "--set", "eval_every=0",
        "--set", "table_every=0",
        "--set", f"trl={{max_steps: 1, per_device_train_batch_size: 4, num_generations: 4, max_completion_length: 8, "
                 f"temperature: {temperature}, learning_rate: 0.01, beta: 0.0, save_steps: 1, logging_steps: 1}}",
    ])
    trainer = train.build_trainer(cfg)
    calls: list = []
    _spy_on_generate(trainer.model, calls)
    trainer.train()
    trainer.save_model(str(out / "final"))
    assert calls
    eos = AutoTokenizer.from_pretrained(opinionated_lm).eos_token_id
    reference = AutoModelForCausalLM.from_pretrained(opinionated_lm).eval()  # the policy of the first step
    width, sequences, scores = calls[0]
    worst, compared = 0.0, 0
    for row, row_scores in zip(sequences, scores):
        completion = row[width:].tolist()
        end = completion.index(eos) + 1 if eos in completion else len(completion)
        with torch.no_grad():
            logits = reference(row.unsqueeze(0)).logits[0, width - 1 : width - 1 + end] / temperature
        tokens = torch.tensor(completion[:end])
        expected = torch.log_softmax(logits, -1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        sampled = torch.log_softmax(row_scores[:end].float(), -1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        worst, compared = max(worst, (sampled - expected).abs().max().item()), compared + end
    assert compared >= 4 and worst < 1e-4, worst
    for folder in (out / "checkpoint-1", out / "final"):
        saved = GenerationConfig.from_pretrained(folder)
        assert {key: getattr(saved, key) for key in OPINIONS} == OPINIONS, folder
    assert all(getattr(trainer.model.generation_config, key) == value for key, value in OPINIONS.items())
