"""Our reward client, installed by `openrlhf_ext.hooks.install()`, driven through OpenRLHF 0.11.2's real executor.

Every failure path must end in a correct reward or a clean stop naming the server, never a `None` reward.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from serve_helpers import PROMPTS, RESPONSES, make_engine, sampling_params

from openrlhf_ext import hooks, reward_client
from openrlhf_ext.reward_client import RewardClientError, check_answer, parse_retry_after
from openrlhf_ext.server_app import ServerSettings, create_app, serve_in_thread
from openrlhf_ext.server_protocol import GuardedScorer
from reward_plugins import build_pipeline, parse_pipeline_config

pytest.importorskip("openrlhf")
from openrlhf.utils import agent  # noqa: E402

CHARS_YAML = "reward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n"


@pytest.fixture()
def installed(monkeypatch):
    """`hooks.install()` as a Ray worker runs it; everything it changes is undone after the test."""
    cls = agent.SingleTurnAgentExecutor
    monkeypatch.setattr(cls, "_fetch_rewards_via_http", cls._fetch_rewards_via_http)
    monkeypatch.setattr(cls, hooks._MARK, False, raising=False)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    for name in (reward_client.TOKEN_ENV, reward_client.BUDGET_ENV):
        monkeypatch.delenv(name, raising=False)
    hooks.install()
    assert cls._fetch_rewards_via_http is reward_client.fetch_rewards_via_http
    return cls


def _chars_scorer() -> GuardedScorer:
    return GuardedScorer(build_pipeline(parse_pipeline_config({"reward": {"type": "length_penalty", "coef": 1.0, "unit": "chars"}})), -99.0)


def _rollouts(tokenizer_dir, n: int):
    pairs = [(PROMPTS[i % 4] + f" Case {i}.", RESPONSES[i % 4]) for i in range(n)]
    tokenizer, engine, prompts = make_engine(tokenizer_dir, pairs)
    return tokenizer, engine, prompts, [-float(len(r)) for _, r in pairs]


def _execute(urls, tokenizer, engine, prompts, max_length: int = 256):
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=[u + "/get_reward" for u in urls])

    async def run():
        return await asyncio.gather(
            *(executor.execute(p, None, sampling_params(), max_length, tokenizer, engine) for p in prompts)
        )

    return asyncio.run(run())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_install_patches_on_import_in_a_fresh_process():
    code = (
        "from openrlhf_ext import hooks; hooks.install()\n"
        "from openrlhf.utils.agent import SingleTurnAgentExecutor as E\n"
        "print(E._fetch_rewards_via_http.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "openrlhf_ext.reward_client", out.stderr[-2000:]


def test_answer_checks_and_retry_after():
    assert check_answer({"rewards": 1.5, "scores": 1.5, "extra_logs": {}}, 1)["rewards"] == 1.5
    for bad in ({"rewards": None}, {"rewards": float("nan")}, {"rewards": True}, {"rewards": [1.0, 2.0]}, [1.0], {"x": 1}):
        with pytest.raises(ValueError):
            check_answer(bad, 1)
    with pytest.raises(ValueError):
        check_answer({"rewards": [1.0, 2.0]}, 3)
    assert parse_retry_after("3") == 3.0 and parse_retry_after("junk") is None and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    with pytest.raises(RewardClientError, match="REWARD_CLIENT_TIMEOUT_S"):
        reward_client.ClientSettings.from_env({reward_client.BUDGET_ENV: "ten"})


def test_server_killed_mid_request_and_restarted(installed, tokenizer_dir, tmp_path, monkeypatch):
    config = tmp_path / "chars.yaml"
    config.write_text(CHARS_YAML)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "openrlhf_ext.serve", "--config", str(config), "--port", str(port),
           "--log-level", "warning", "--torch-threads", "1", "--max-batch-size", "64", "--max-wait-ms", "600000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tokenizer, engine, prompts, expected = _rollouts(tokenizer_dir, 12)
    monkeypatch.setenv(reward_client.BUDGET_ENV, "120")
    outputs: list = []
    rollout = threading.Thread(target=lambda: outputs.extend(_execute([url], tokenizer, engine, prompts)))
    try:
        rollout.start()
        for _ in range(2400):
            try:
                if httpx.get(url + "/health", timeout=1).json()["queued"] == len(prompts):
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, "server exited"
            time.sleep(0.05)
        else:
            raise AssertionError("the requests never reached the server")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(2.0)
    with serve_in_thread(create_app(_chars_scorer()), port=port):
        rollout.join(timeout=120)
    assert [o["reward"] for o in outputs] == expected, "every sample in flight at the kill is rewarded after the restart"


def test_overloaded_server_serves_every_sample(installed, tokenizer_dir):
    scorer = _chars_scorer()
    real = scorer.score

    def slow(samples):
        time.sleep(0.1)
        return real(samples)

    scorer.score = slow
    app = create_app(scorer, ServerSettings(max_batch_size=2, max_wait_ms=0, max_queue=2, request_timeout_s=0.3))
    refused = []

    @app.middleware("http")
    async def count(request, call_next):
        response = await call_next(request)
        refused.append(response.status_code == 429)
        return response

    tokenizer, engine, prompts, expected = _rollouts(tokenizer_dir, 24)
    with serve_in_thread(app) as url:
        outputs = _execute([url], tokenizer, engine, prompts)
    assert [o["reward"] for o in outputs] == expected
    assert all(o["extra_logs"]["reward/errors"] == 0.0 for o in outputs)
    assert sum(refused) > 0, "the queue must really have overflowed for this test to mean anything"


def test_refusal_stops_cleanly_and_token_travels_in_a_header(installed, tokenizer_dir, monkeypatch, caplog):
    settings = ServerSettings(token="s3cret-token")
    tokenizer, engine, prompts, expected = _rollouts(tokenizer_dir, 3)
    with serve_in_thread(create_app(_chars_scorer(), settings)) as url:
        started = time.monotonic()
        with pytest.raises(RewardClientError, match=r"127\.0\.0\.1:\d+/get_reward refused the request \(HTTP 401"):
            _execute([url], tokenizer, engine, prompts[:1])
        assert time.monotonic() - started < 5, "a 401 is not retried"
        monkeypatch.setenv(reward_client.TOKEN_ENV, "s3cret-token")
        with caplog.at_level(logging.DEBUG):
            outputs = _execute([url], tokenizer, engine, prompts)
    assert [o["reward"] for o in outputs] == expected
    assert "s3cret-token" not in caplog.text


def _flaky_app(script: list[str]) -> tuple[FastAPI, list[float]]:
    """A server that answers from `script` ('garbage', 'retry', then 'ok' forever); 'ok' scores like _chars_scorer."""
    app, seen = FastAPI(), []

    @app.post("/get_reward")
    async def get_reward(request: Request):
        seen.append(time.monotonic())
        step = script.pop(0) if script else "ok"
        if step == "garbage":
            return Response(b"\xff\x00 not json", media_type="application/json")
        if step == "retry":
            return Response(b"busy", status_code=503, headers={"Retry-After": "1"})
        body = await request.json()
        outcomes = _chars_scorer().score_raw(body["query"], body["prompts"], body["labels"])
        return {"rewards": outcomes[0].reward, "scores": outcomes[0].score, "extra_logs": outcomes[0].logs}

    return app, seen


def test_bad_bytes_retry_after_and_failover(installed, tokenizer_dir, monkeypatch):
    tokenizer, engine, prompts, expected = _rollouts(tokenizer_dir, 1)
    flaky, seen = _flaky_app(["garbage", "retry"])
    with serve_in_thread(flaky) as url:
        outputs = _execute([url], tokenizer, engine, prompts)
    assert [o["reward"] for o in outputs] == expected
    assert len(seen) == 3 and seen[2] - seen[1] >= 1.0, "Retry-After: 1 was honoured"

    always_bad, _ = _flaky_app(["garbage"] * 10_000)
    tokenizer, engine, prompts, expected = _rollouts(tokenizer_dir, 8)
    with serve_in_thread(always_bad) as bad, serve_in_thread(create_app(_chars_scorer())) as good:
        outputs = _execute([bad, good], tokenizer, engine, prompts)
        assert [o["reward"] for o in outputs] == expected, "retries move to the next server"
        monkeypatch.setenv(reward_client.BUDGET_ENV, "1.5")
        with pytest.raises(RewardClientError, match=rf"no reward after 1.5 s .* last server {bad}/get_reward: bad answer"):
            _execute([bad], tokenizer, engine, prompts[:1])


class _AnyPromptEngine:
    """Answers every (possibly cut) prompt with the same response tokens."""

    def __init__(self, response_ids):
        self.response_ids = list(response_ids)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        output = SimpleNamespace(token_ids=list(self.response_ids), finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[output])


@pytest.mark.parametrize("text", ["龍が絵を描くことを学ぶ短い物語を書いてください。" * 3, "Paint 🐉🎨 a dragon 🌅🌊 story " * 3], ids=["cjk", "emoji"])
def test_left_cut_multibyte_prompts_still_match(installed, tokenizer_dir, text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    response = "答えは簡単です 🐉 the end<eos>"
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    expected = -float(len(tokenizer.decode(response_ids, skip_special_tokens=False)))
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    cuts = range(30, min(n_prompt, 90))
    engine = _AnyPromptEngine(response_ids)
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=["unset"])
    with serve_in_thread(create_app(_chars_scorer())) as url:
        executor.reward_endpoints = [url + "/get_reward"]

        async def run():
            params = SimpleNamespace(max_tokens=len(response_ids), logprobs=None)
            return await asyncio.gather(
                *(executor.execute(prompt, None, params, k + len(response_ids), tokenizer, engine) for k in cuts)
            )

        outputs = asyncio.run(run())
    queries = [tokenizer.decode(o["observation_tokens"], skip_special_tokens=False) for o in outputs]
    assert sum(q.startswith("\ufffd") for q in queries) >= 5, "some cuts must fall inside a multi-byte character"
    assert [o["reward"] for o in outputs] == [expected] * len(cuts)
