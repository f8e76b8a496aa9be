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


CHARS_REWARD = {"type": "length_penalty", "coef": 1.0, "unit": "chars"}


def chars_scorer(on_error: str = "penalty", error_penalty: float | None = -99.0):
    """A server-side scorer whose reward is minus the response's length in characters (easy to check by hand)."""
    from openrlhf_ext.server_protocol import GuardedScorer
    from reward_plugins import build_pipeline, parse_pipeline_config

    config = {"reward": CHARS_REWARD, "on_error": on_error}
    if error_penalty is not None:
        config["error_penalty"] = error_penalty
    return GuardedScorer(build_pipeline(parse_pipeline_config(config)))


def chars_rollouts(tokenizer_dir, n: int):
    """Tokenizer, engine, n templated prompts and each sample's expected chars reward (computed by hand)."""
    pairs = [(PROMPTS[i % 4] + f" Case {i}.", RESPONSES[i % 4]) for i in range(n)]
    tokenizer, engine, prompts = make_engine(tokenizer_dir, pairs)
    return tokenizer, engine, prompts, [-float(len(r)) for _, r in pairs]


def execute(urls: list[str], tokenizer, engine, prompts: list[str], labels=None, max_length: int = 256) -> list[dict]:
    """Every prompt through OpenRLHF 0.11.2's own SingleTurnAgentExecutor at once, against these servers."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor(remote_rm_url=[u + "/get_reward" for u in urls])
    labels = labels if labels is not None else [None] * len(prompts)

    async def run():
        return await asyncio.gather(
            *(executor.execute(p, lab, sampling_params(), max_length, tokenizer, engine) for p, lab in zip(prompts, labels))
        )

    return asyncio.run(run())


def install_client(monkeypatch):
    """`hooks.install()` as a Ray worker runs it, with a fresh server book; undone after the test."""
    import sys

    from openrlhf.utils import agent

    from openrlhf_ext import hooks, reward_client

    cls = agent.SingleTurnAgentExecutor
    monkeypatch.setattr(cls, "_fetch_rewards_via_http", cls._fetch_rewards_via_http)
    monkeypatch.setattr(cls, hooks._MARK, False, raising=False)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    for name in (reward_client.TOKEN_ENV, reward_client.TOKEN_FILE_ENV, reward_client.BUDGET_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(reward_client, "_BOOK", reward_client.ServerBook())
    hooks.install()
    assert cls._fetch_rewards_via_http is reward_client.fetch_rewards_via_http
    return cls
