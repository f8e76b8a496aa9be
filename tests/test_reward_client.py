"""Our reward client, installed by `openrlhf_ext.hooks.install()`, driven through OpenRLHF 0.11.2's real executor.

Every failure path must end in the sample's own reward or a clean stop naming the server, never a `None` reward,
and never a penalty for a sample that could be scored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import aiohttp
import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from serve_helpers import chars_rollouts, chars_scorer, execute, install_client

from openrlhf_ext import reward_client
from openrlhf_ext.reward_client import ClientSettings, RewardClientError, ServerBook, parse_retry_after
from openrlhf_ext.server_app import ServerSettings, create_app, serve_in_thread

pytest.importorskip("openrlhf")
from openrlhf.utils import agent  # noqa: E402

CHARS_YAML = "on_error: penalty\nerror_penalty: -99\nreward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n"


@pytest.fixture()
def installed(monkeypatch):
    return install_client(monkeypatch)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scripted_app(script: list, answer=None) -> tuple[FastAPI, list[float]]:
    """A server answering POSTs from `script` (a status, or a (status, body, headers) triple), then by `answer`
    (default: the chars reward of the request, as our server computes it); no /health (a foreign server)."""
    app, seen = FastAPI(), []
    scorer = chars_scorer()

    @app.post("/get_reward")
    async def get_reward(request: Request):
        seen.append(time.monotonic())
        body = await request.json()
        step = script.pop(0) if script else None
        if isinstance(step, int):
            return Response(b"busy", status_code=step)
        if isinstance(step, tuple):
            return Response(step[1], status_code=step[0], headers=step[2], media_type="application/json")
        if answer is not None:
            return answer(body, request)
        outcomes = scorer.score_raw(body["query"], body["prompts"], body["labels"])
        only = outcomes[0]
        return {"rewards": only.reward, "scores": only.reward, "extra_logs": only.logs}

    return app, seen


def _direct(urls, payload, settings, book=None):
    """`score_with_retries` outside the executor, with its own session and book."""

    async def run():
        async with aiohttp.ClientSession() as session:
            return await reward_client.score_with_retries(urls, 0, payload, settings, session, book or ServerBook())

    return asyncio.run(run())


ONE = {"query": ["<|user|>hi<eos><|assistant|>four"], "prompts": ["<|user|>hi<eos><|assistant|>"], "labels": [None]}


def test_install_patches_on_import_in_a_fresh_process():
    code = (
        "from openrlhf_ext import hooks; hooks.install()\n"
        "from openrlhf.utils.agent import SingleTurnAgentExecutor as E\n"
        "print(E._fetch_rewards_via_http.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "openrlhf_ext.reward_client", out.stderr[-2000:]


def test_retry_after_parsing_and_budget_variable():
    assert parse_retry_after("3") == 3.0 and parse_retry_after("junk") is None and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    with pytest.raises(RewardClientError, match="REWARD_CLIENT_TIMEOUT_S"):
        ClientSettings.from_env({reward_client.BUDGET_ENV: "ten"})


def test_backoff_and_breaker_are_capped_and_grow():
    settings = ClientSettings(base_delay_s=0.25, max_delay_s=10.0, breaker_base_s=1.0, breaker_max_s=60.0)
    rng = random.Random(0)
    delays = [settings.backoff(attempt, rng) for attempt in range(3000)]
    assert all(0 < d <= 10.0 for d in delays), "a long outage never sleeps past max_delay_s (nor overflows)"
    assert min(delays[10:]) >= 5.0, "equal jitter: at least half the capped delay"
    assert delays[0] <= 0.25
    assert [settings.breaker_s(k) for k in (1, 2, 3, 4, 7, 8, 5000)] == [1.0, 2.0, 4.0, 8.0, 60.0, 60.0, 60.0]


def test_book_puts_a_server_aside_then_lets_one_probe_through():
    settings = ClientSettings(breaker_base_s=1.0)
    book, rng = ServerBook(), random.Random(0)
    urls = ["http://a/get_reward", "http://b/get_reward"]
    a = book.state(urls[0])
    now = time.monotonic()
    assert book.choose(urls, 0, now, {}) is a
    for expected in (1.0, 2.0, 4.0):
        assert book.failed(a, reward_client._Failure("x", breaker=True), settings, rng) == expected
    assert book.choose(urls, 0, time.monotonic(), {}).url == urls[1], "a server put aside is skipped"
    b = book.state(urls[1])
    b.blocked_until = time.monotonic() + 100
    assert book.choose(urls, 0, time.monotonic(), {}) is None
    assert book.wake_at(urls, time.monotonic(), {}) == a.blocked_until
    later = a.blocked_until + 0.01
    assert book.choose(urls, 0, later, {}) is a, "after its interval the server is probed again"
    a.probing = True
    assert book.choose(urls, 0, later, {}) is None, "one probe at a time"
    book.succeeded(a)
    assert a.failures == 0
    a.probing = False
    assert book.failed(a, reward_client._Failure("x", breaker=True), settings, rng) == 1.0, "a success resets it"
    assert book.failed(b, reward_client._Failure("x", retry_after=3600.0), settings, rng) < 31, "Retry-After capped"


def test_server_killed_mid_request_and_restarted(installed, tokenizer_dir, tmp_path, monkeypatch):
    config = tmp_path / "chars.yaml"
    config.write_text(CHARS_YAML)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "openrlhf_ext.serve", "--config", str(config), "--port", str(port),
           "--log-level", "warning", "--torch-threads", "1", "--max-batch-size", "64", "--max-wait-ms", "600000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tokenizer, engine, prompts, expected = chars_rollouts(tokenizer_dir, 12)
    for _ in range(1200):
        try:
            httpx.get(url + "/health", timeout=1)
            break
        except httpx.HTTPError:
            assert proc.poll() is None, "server exited"
            time.sleep(0.1)
    monkeypatch.setenv(reward_client.BUDGET_ENV, "120")
    outputs: list = []
    rollout = threading.Thread(target=lambda: outputs.extend(execute([url], tokenizer, engine, prompts)))
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
    with serve_in_thread(create_app(chars_scorer()), port=port):
        rollout.join(timeout=120)
    assert [o["reward"] for o in outputs] == expected, "every sample in flight at the kill is rewarded after the restart"


def test_overloaded_server_serves_every_sample(installed, tokenizer_dir):
    scorer = chars_scorer()
    real = scorer.score

    def slow(samples):
        time.sleep(0.1)
        return real(samples)

    scorer.score = slow
    app = create_app(scorer, ServerSettings(max_batch_size=2, max_wait_ms=0, max_queue=2, request_timeout_s=0.3))
    tokenizer, engine, prompts, expected = chars_rollouts(tokenizer_dir, 24)
    with serve_in_thread(app) as url:
        outputs = execute([url], tokenizer, engine, prompts)
    assert [o["reward"] for o in outputs] == expected
    assert all(o["extra_logs"]["reward/errors"] == 0.0 for o in outputs)
    assert app.state.statuses["429"] > 0, "the queue must really have overflowed for this test to mean anything"


def test_refusal_stops_cleanly_and_token_travels_in_a_header(installed, tokenizer_dir, monkeypatch, caplog, tmp_path):
    settings = ServerSettings(token="s3cret-token")
    tokenizer, engine, prompts, expected = chars_rollouts(tokenizer_dir, 3)
    with serve_in_thread(create_app(chars_scorer(), settings)) as url:
        started = time.monotonic()
        with pytest.raises(RewardClientError, match=r"127\.0\.0\.1:\d+/get_reward refused the request \(HTTP 401"):
            execute([url], tokenizer, engine, prompts[:1])
        assert time.monotonic() - started < 5, "a 401 is not retried"
        token_file = tmp_path / "token"
        token_file.write_text("s3cret-token\n")
        monkeypatch.setenv(reward_client.TOKEN_FILE_ENV, str(token_file))
        monkeypatch.setattr(reward_client, "_BOOK", ServerBook())
        with caplog.at_level(logging.DEBUG):
            outputs = execute([url], tokenizer, engine, prompts)
    assert [o["reward"] for o in outputs] == expected
    assert "s3cret-token" not in caplog.text
    monkeypatch.setenv(reward_client.TOKEN_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(RewardClientError, match="REWARD_SERVER_TOKEN_FILE names .*missing, which cannot be read"):
        ClientSettings.from_env()


def test_500_and_502_are_retried_and_garbage_moves_on(installed, tokenizer_dir, monkeypatch):
    tokenizer, engine, prompts, expected = chars_rollouts(tokenizer_dir, 1)
    flaky, seen = _scripted_app([500, 502, (200, b"\xff\x00 not json", {}), (503, b"busy", {"Retry-After": "1"})])
    with serve_in_thread(flaky) as url:
        outputs = execute([url], tokenizer, engine, prompts)
    assert [o["reward"] for o in outputs] == expected
    assert len(seen) == 5 and seen[4] - seen[3] >= 1.0, "500, 502, garbage and 503 retried; Retry-After: 1 honoured"

    always_bad, _ = _scripted_app([(200, b"garbage", {})] * 10_000)
    tokenizer, engine, prompts, expected = chars_rollouts(tokenizer_dir, 8)
    with serve_in_thread(always_bad) as bad, serve_in_thread(create_app(chars_scorer())) as good:
        outputs = execute([bad, good], tokenizer, engine, prompts)
        assert [o["reward"] for o in outputs] == expected, "retries move to the next server"
        monkeypatch.setenv(reward_client.BUDGET_ENV, "1.5")
        with pytest.raises(RewardClientError, match=rf"no reward for 1 of 1 .* {bad}/get_reward: HTTP 200, 7 bytes"):
            execute([bad], tokenizer, engine, prompts[:1])


def test_one_attempt_never_overruns_the_budget(installed):
    """A server that accepts connections and never answers costs at most the budget, not 180 s per attempt."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/get_reward"
    try:
        started = time.monotonic()
        with pytest.raises(RewardClientError, match=r"after 2 s .* no answer within"):
            _direct([url], ONE, ClientSettings(budget_s=2.0))
        assert time.monotonic() - started < 4.0
    finally:
        silent.close()

    app = FastAPI()  # answers /health at once (no request timeout announced), never the POST

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/get_reward")
    async def hang():
        await asyncio.sleep(60)

    with serve_in_thread(app) as slow:
        started = time.monotonic()
        with pytest.raises(RewardClientError, match=r"after 2 s .* no answer within [0-9.]+ s"):
            _direct([slow + "/get_reward"], ONE, ClientSettings(budget_s=2.0))
        assert time.monotonic() - started < 4.0


def test_retry_after_never_holds_a_sample_back_from_a_healthy_server(installed):
    minded = {"n": 0}

    def busy(body, request):
        minded["n"] += 1
        return Response(b"{}", status_code=429, headers={"Retry-After": "3600"})

    sleepy, _ = _scripted_app([], answer=busy)
    with serve_in_thread(sleepy) as first, serve_in_thread(create_app(chars_scorer())) as second:
        book = ServerBook()
        started = time.monotonic()
        for _ in range(6):
            (outcome,) = _direct([first + "/get_reward", second + "/get_reward"], ONE, ClientSettings(budget_s=60), book)
            assert outcome.reward == -4.0
        assert time.monotonic() - started < 5.0
        assert minded["n"] == 6, "each sample asked the busy server once, then went to the healthy one"

    once, _ = _scripted_app([(429, b"{}", {"Retry-After": "3600"})])
    with serve_in_thread(once) as only:
        started = time.monotonic()
        (outcome,) = _direct([only + "/get_reward"], ONE, ClientSettings(budget_s=60, max_retry_after_s=0.5))
        assert outcome.reward == -4.0 and time.monotonic() - started < 3.0, "Retry-After is capped"


def test_breaker_puts_a_refusing_server_aside(installed):
    accepted = []
    closer = socket.socket()
    closer.bind(("127.0.0.1", 0))
    closer.listen(64)
    closer.settimeout(0.2)
    stop = threading.Event()

    def hang_up():
        while not stop.is_set():
            try:
                conn, _ = closer.accept()
            except OSError:
                continue
            accepted.append(time.monotonic())
            conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    bad = f"http://127.0.0.1:{closer.getsockname()[1]}/get_reward"
    try:
        with serve_in_thread(create_app(chars_scorer())) as good:
            book = ServerBook()
            for _ in range(20):
                (outcome,) = _direct([bad, good + "/get_reward"], ONE, ClientSettings(budget_s=30), book)
                assert outcome.reward == -4.0
            assert len(accepted) < 6, f"20 samples: the refusing server was tried {len(accepted)} times, not 10"
            time.sleep(book.state(bad).blocked_until - time.monotonic() + 0.05)
            _direct([bad, good + "/get_reward"], ONE, ClientSettings(budget_s=30), book)
            assert len(accepted) >= 2 and book.state(bad).failures >= 2, "probed again later; the interval grows"
    finally:
        stop.set()
        thread.join()
        closer.close()


def test_attempt_timeout_follows_the_announced_request_timeout(installed):
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok", "request_timeout_s": 0.5}

    @app.post("/get_reward")
    async def hang():
        await asyncio.sleep(60)

    with serve_in_thread(app) as slow, serve_in_thread(create_app(chars_scorer())) as good:
        started = time.monotonic()
        book = ServerBook()
        (outcome,) = _direct([slow + "/get_reward", good + "/get_reward"], ONE, ClientSettings(budget_s=120), book)
        elapsed = time.monotonic() - started
    assert outcome.reward == -4.0
    assert elapsed < 10, f"the attempt should end at 1.1 x 0.5 s + slack, not 180 s (took {elapsed:.1f} s)"
    assert book.state(slow + "/get_reward").failures == 1


@pytest.mark.parametrize("field", ["rewards", "scores"])
@pytest.mark.parametrize("bad", ["1e400", "3.5e38", "NaN", "\"0.5\"", "[[0.5]]", "[0.5, 0.5]", "true", "null", "-1" + "0" * 400])
def test_every_number_is_checked_before_openrlhf_sees_it(installed, field, bad):
    if field == "scores" and bad == "null":
        pytest.skip("a null score means 'use the reward' in OpenRLHF's protocol")
    body = '{"rewards": 0.5, "scores": 0.5, "extra_logs": {"reward/mean": 0.5}}'.replace(f'"{field}": 0.5', f'"{field}": {bad}')
    liar, _ = _scripted_app([(200, body.encode(), {})])
    with serve_in_thread(liar) as url:
        (outcome,) = _direct([url + "/get_reward"], ONE, ClientSettings(budget_s=60))
    assert outcome.reward == -4.0, f"{field} = {bad} is retried (on the same server here), never handed over"


def test_answers_are_size_capped(installed):
    def huge(body, request):
        chunk = b" " * (1024 * 1024)
        return StreamingResponse(iter([b'{"rewards": 1.0, "pad": "'] + [chunk] * 64 + [b'"}']), media_type="application/json")

    flood, seen = _scripted_app([], answer=huge)
    with serve_in_thread(flood) as bad, serve_in_thread(create_app(chars_scorer())) as good:
        (outcome,) = _direct([bad + "/get_reward", good + "/get_reward"], ONE, ClientSettings(budget_s=60))
    assert outcome.reward == -4.0 and len(seen) == 1


def test_logs_and_errors_never_carry_body_or_header_values(installed, tokenizer_dir, monkeypatch, caplog):
    """A proxy that echoes the request (headers included) into its answers must not put the token in a log line."""
    secret = "tok-echo-7f3a"

    def echo(status):
        def answer(body, request):
            echoed = repr(dict(request.headers)) + repr(body)
            return Response(echoed.encode(), status_code=status, headers={"X-Echo": request.headers["authorization"],
                                                                          "Retry-After": echoed[:50]})
        return answer

    monkeypatch.setenv(reward_client.TOKEN_ENV, secret)
    monkeypatch.setenv(reward_client.BUDGET_ENV, "2")
    tokenizer, engine, prompts, _ = chars_rollouts(tokenizer_dir, 1)
    messages = []
    with caplog.at_level(logging.DEBUG):
        for status in (500, 422, 200):
            proxy, _ = _scripted_app([], answer=echo(status))
            with serve_in_thread(proxy) as url:
                monkeypatch.setattr(reward_client, "_BOOK", ServerBook())
                with pytest.raises(RewardClientError) as stopped:
                    execute([url], tokenizer, engine, prompts)
                messages.append(str(stopped.value))
    text = caplog.text + "\n".join(messages)
    assert secret not in text and "authorization" not in text.lower()
    assert all("request " in m and "bytes" in m for m in messages), messages


def test_left_cut_multibyte_prompts_still_match(installed, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in ["龍が絵を描くことを学ぶ短い物語を書いてください。" * 3, "Paint 🐉🎨 a dragon 🌅🌊 story " * 3]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        response = "答えは簡単です 🐉 the end<eos>"
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        expected = -float(len(tokenizer.decode(response_ids, skip_special_tokens=False)))
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        cuts = range(30, min(n_prompt, 90))
        engine = _AnyPromptEngine(response_ids)
        executor = agent.SingleTurnAgentExecutor(remote_rm_url=["unset"])
        with serve_in_thread(create_app(chars_scorer())) as url:
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


class _AnyPromptEngine:
    """Answers every (possibly cut) prompt with the same response tokens."""

    def __init__(self, response_ids):
        self.response_ids = list(response_ids)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        output = SimpleNamespace(token_ids=list(self.response_ids), finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[output])
