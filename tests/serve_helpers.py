"""Shared pieces for the reward-server and reward_func tests: a fake vLLM engine driven by OpenRLHF's executor."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from transformers import AutoTokenizer

PROMPTS = [
    "Write a short story about a dragon who learns to paint.",
    "List three fruits.",
    "Answer the question politely and explain your reasoning step by step.",
    "Chapter two begins with a storm over the harbour.",
]
RESPONSES = [
    "The dragon opened the door and smiled at the morning light.<eos>",
    "apple, banana, cherry<eos>",
    "The reward model scores the answer; the policy learns from the reward.<eos>",
    "In summary: the hero leaves the village and finds the lost map.<eos>",
]


class FakeEngine:
    """Stands in for OpenRLHF's RolloutRayActor: `generate` returns fixed response tokens per prompt."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.by_prompt_ids: dict[tuple[int, ...], list[int]] = {}

    def register(self, templated_prompt: str, response: str) -> None:
        ids = tuple(self.tokenizer(templated_prompt, add_special_tokens=False)["input_ids"])
        self.by_prompt_ids[ids] = self.tokenizer(response, add_special_tokens=False)["input_ids"]

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        await asyncio.sleep(0)
        tokens = self.by_prompt_ids[tuple(prompt_token_ids)]
        output = SimpleNamespace(token_ids=list(tokens), finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[output])


def chat_prompt(tokenizer, text: str) -> str:
    """The prompt string as OpenRLHF builds it with --data.apply_chat_template."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def make_engine(tokenizer_dir, pairs: list[tuple[str, str]]) -> tuple[object, FakeEngine, list[str]]:
    """Tokenizer, an engine answering each templated prompt with its response, and the templated prompts."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    engine = FakeEngine(tokenizer)
    prompts = []
    for text, response in pairs:
        prompt = chat_prompt(tokenizer, text)
        engine.register(prompt, response)
        prompts.append(prompt)
    return tokenizer, engine, prompts


def sampling_params(max_tokens: int = 64) -> SimpleNamespace:
    return SimpleNamespace(max_tokens=max_tokens, logprobs=None)
