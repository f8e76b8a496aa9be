"""The reward server driven by OpenRLHF 0.11.2's own HTTP client (SingleTurnAgentExecutor) on tiny real RMs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
import threading
import time

import httpx
import numpy as np
import pytest
from serve_helpers import PROMPTS, RESPONSES, execute, install_client, make_engine, sampling_params

from openrlhf_ext.server_app import ServerSettings, create_app, serve_in_thread
from openrlhf_ext.server_protocol import GuardedScorer, derive_response
from reward_plugins import Sample, build_pipeline, load_pipeline_config, parse_pipeline_config

pytest.importorskip("openrlhf")
from openrlhf.utils.agent import SingleTurnAgentExecutor  # noqa: E402

ENSEMBLE = "configs/rewards/ensemble_uwo5.yaml"


@pytest.fixture(scope="module")
def ensemble_scorer(tiny_dir, rm_dirs):
    mp = pytest.MonkeyPatch()
    mp.setenv("MODELS_DIR", str(tiny_dir))
    config = load_pipeline_config(ENSEMBLE)
    mp.undo()
    return GuardedScorer(build_pipeline(config))


@pytest.fixture(scope="module")
def ensemble_server(ensemble_scorer):
    app = create_app(ensemble_scorer, ServerSettings(max_batch_size=16, max_wait_ms=50))
    with serve_in_thread(app) as url:
        yield url, app


def run_executor(url: str, tokenizer, engine, prompts, labels):
    executor = SingleTurnAgentExecutor(remote_rm_url=[url + "/get_reward"])

    async def all_samples():
        return await asyncio.gather(
            *(executor.execute(p, lab, sampling_params(), 256, tokenizer, engine) for p, lab in zip(prompts, labels))
        )

    return asyncio.run(all_samples())


def test_derive_response_rules():
    assert derive_response("<|user|>hi<eos><|assistant|>yes<eos>", "<|user|>hi<eos><|assistant|>") == "yes<eos>"
    long_prompt = "x" * 10 + "a long prompt cut from the left by OpenRLHF<|assistant|>"
    assert derive_response(long_prompt[12:] + "reply", long_prompt) == "reply"
    with pytest.raises(ValueError, match="does not start with the prompt"):
        derive_response("something else entirely", "<|user|>hi")


def test_openrlhf_client_gets_pipeline_rewards_batched(ensemble_server, ensemble_scorer, tokenizer_dir):
    url, app = ensemble_server
    pairs = [(PROMPTS[i % 4] + f" Variant {i}.", RESPONSES[i % 4]) for i in range(48)]
    tokenizer, engine, prompts = make_engine(tokenizer_dir, pairs)
    labels = [{"id": f"row-{i}"} for i in range(len(pairs))]
    before = app.state.batcher.stats.batches
    outputs = run_executor(url, tokenizer, engine, prompts, labels)

    direct = ensemble_scorer.pipeline.score([Sample(p, r) for p, (_, r) in zip(prompts, pairs)])
    got = np.array([o["reward"] for o in outputs], dtype=float)
    np.testing.assert_allclose(got, np.array(direct.rewards, dtype=float), rtol=1e-4, atol=1e-4)
    assert len(set(np.round(got, 4))) > 10, "distinct samples should get distinct ensemble rewards"
    keys = list(ensemble_scorer.log_keys)
    for i, out in enumerate(outputs):
        assert list(out["extra_logs"]) == keys
        assert out["extra_logs"]["reward/errors"] == 0.0
        assert out["scores"] == out["reward"]
        assert out["extra_logs"]["reward/seed1"] == pytest.approx(direct.results[i].components["seed1"], abs=1e-4)
    batches = app.state.batcher.stats.batches - before
    assert batches < len(pairs), f"48 concurrent requests were scored in {batches} batches: no batching"


def test_errored_samples_reach_openrlhf_with_the_penalty_our_client_applies(ensemble_server, tokenizer_dir, monkeypatch):
    url, _ = ensemble_server
    tokenizer, engine, prompts = make_engine(tokenizer_dir, [(PROMPTS[0], RESPONSES[0]), (PROMPTS[1], "")])
    stock = run_executor(url, tokenizer, engine, prompts, [None, None])
    assert stock[1]["reward"] is None, "no fallback crosses the wire: OpenRLHF's own client gets no reward"
    install_client(monkeypatch)
    outputs = execute([url], tokenizer, engine, prompts)
    good, empty = outputs
    assert good["reward"] == pytest.approx(stock[0]["reward"])
    assert good["extra_logs"]["reward/errors"] == 0.0 and good["reward"] != -1.0
    assert empty["reward"] == -1.0, "an empty response errors; on_error: penalty gives error_penalty, never None"
    assert empty["extra_logs"]["reward/errors"] == 1.0
    assert list(empty["extra_logs"]) == list(good["extra_logs"])

    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    for out in outputs:
        experience = SamplesGenerator._process_response_into_experience(None, out, max_len=256)
        assert experience.rewards is not None and experience.rewards.shape == (1,)
        assert float(experience.info["reward/errors"][0]) == out["extra_logs"]["reward/errors"]


def test_failed_samples_cross_the_wire_as_coded_errors_without_a_reward(tokenizer_dir):
    config = parse_pipeline_config(
        {"on_error": "raise", "reward": {"type": "length_penalty", "name": "len", "coef": 0.5, "unit": "tokens"}}
    )
    with serve_in_thread(create_app(GuardedScorer(build_pipeline(config)))) as url:
        body = httpx.post(url + "/get_reward", json={"query": ["pq resp"], "prompts": ["pq"], "labels": [None]}).json()
        mixed = httpx.post(url + "/get_reward", json={"query": ["pa", "zz"], "prompts": ["p", "q" * 20]}).json()
        health = httpx.get(url + "/health").json()
    assert body["rewards"] is None and body["scores"] is None and body["extra_logs"]["reward/errors"] == 1.0
    assert body["errors"] == [{"code": "plugin_error", "retry": False, "message": body["errors"][0]["message"]}]
    assert "token" in body["errors"][0]["message"], "the plugin's own reason, for the server's log"
    assert mixed["rewards"] == [None, None] and [e["code"] for e in mixed["errors"]] == ["plugin_error", "no_response"]
    assert health["policy"] == {"on_error": "raise", "error_penalty": None}, "the client applies the YAML's policy"


def _rule_scorer(penalty: float = 0.0) -> GuardedScorer:
    config = parse_pipeline_config(
        {"reward": {"type": "length_penalty", "name": "len", "coef": 1.0, "unit": "chars"}, "on_error": "penalty",
         "error_penalty": penalty}
    )
    return GuardedScorer(build_pipeline(config))


def test_malformed_oversized_and_token():
    settings = ServerSettings(max_request_samples=4, max_body_bytes=2000, token="s3cret")
    with serve_in_thread(create_app(_rule_scorer(), settings)) as url:
        endpoint = url + "/get_reward"
        auth = {"Authorization": "Bearer s3cret"}
        ok = {"query": ["pabc"], "prompts": ["p"], "labels": [None]}
        assert httpx.post(endpoint, json=ok).status_code == 401
        assert httpx.post(endpoint, json=ok, headers={"Authorization": "Bearer nope"}).status_code == 401
        good = httpx.post(endpoint, json=ok, headers=auth)
        assert good.status_code == 200 and good.json()["rewards"] == -3.0
        assert httpx.post(endpoint + "?token=s3cret", json=ok).status_code == 401, "tokens in URLs end up in logs"

        as_json = {**auth, "Content-Type": "application/json"}
        bad_json = httpx.post(endpoint, content=b"{not json", headers=as_json)
        assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]
        plain = httpx.post(endpoint, content=json.dumps(ok), headers={**auth, "Content-Type": "text/plain"})
        assert plain.status_code == 415, "a cross-origin text/plain POST must not be scored"
        bad_utf8 = httpx.post(endpoint, content=b'{"query": ["p\xff\xfe"]}', headers=as_json)
        assert bad_utf8.status_code == 400 and "UTF-8" in bad_utf8.json()["error"]
        mismatch = httpx.post(endpoint, json={"query": ["a", "b"], "prompts": ["a"]}, headers=auth)
        assert mismatch.status_code == 422 and "prompts has 1 entries" in mismatch.json()["error"]
        wrong_type = httpx.post(endpoint, json={"query": "pabc"}, headers=auth)
        assert wrong_type.status_code == 422 and "query" in wrong_type.json()["error"]
        too_many = httpx.post(endpoint, json={"query": ["a"] * 5}, headers=auth)
        assert too_many.status_code == 413 and "limit is 4" in too_many.json()["error"]
        too_big = httpx.post(endpoint, json={"query": ["x" * 5000]}, headers=auth)
        assert too_big.status_code == 413

        assert httpx.get(url + "/health").json() == {"status": "ok"}, "counters only with the token"
        health = httpx.get(url + "/health", headers=auth).json()
        assert health["status"] == "ok" and health["log_keys"][:3] == ["reward/mean", "reward/errors", "reward/skipped"]
        assert health["request_timeout_s"] == 120.0 and "s3cret" not in json.dumps(health)
        for page in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(url + page).status_code == 404 and httpx.get(url + page, headers=auth).status_code == 404


def test_hostile_bodies_get_4xx_never_5xx():
    settings = ServerSettings(max_body_bytes=4_000_000, max_request_samples=100_000)
    with serve_in_thread(create_app(_rule_scorer(), settings)) as url:
        endpoint = url + "/get_reward"
        deep = b'{"query": ["pabc"], "labels": [' + b"[" * 5000 + b"]" * 5000 + b"]}"
        moderately_deep = b'{"query": ["pabc"], "labels": [' + b"[" * 200 + b"]" * 200 + b"]}"
        many_errors = json.dumps({"query": [1] * 50_000}).encode()
        answers = {
            "deep": httpx.post(endpoint, content=deep, headers={"Content-Type": "application/json"}),
            "200 deep": httpx.post(endpoint, content=moderately_deep, headers={"Content-Type": "application/json"}),
            "422": httpx.post(endpoint, content=many_errors, headers={"Content-Type": "application/json"}),
        }
    assert answers["deep"].status_code == 400 and "deeper than" in answers["deep"].json()["error"]
    assert answers["200 deep"].status_code == 400
    unprocessable = answers["422"]
    assert unprocessable.status_code == 422 and len(unprocessable.content) < 2000
    assert unprocessable.json()["error"].endswith("and 49995 more")


def test_full_queue_waits_its_turn_then_429():
    scorer = _rule_scorer()
    release = threading.Event()
    original = scorer.score

    def blocking(samples):
        release.wait(timeout=60)
        return original(samples)

    scorer.score = blocking
    settings = ServerSettings(max_batch_size=1, max_wait_ms=0, max_queue=2, request_timeout_s=30)
    app = create_app(scorer, settings)
    batcher = app.state.batcher

    async def until(condition, what: str) -> None:
        for _ in range(3000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"never reached: {what}; {batcher.stats}, queued {batcher.queued}")

    with serve_in_thread(app) as url:

        async def burst():
            async with httpx.AsyncClient(timeout=90) as client:
                payload = {"query": ["pabc"], "prompts": ["p"]}
                post = lambda: asyncio.create_task(client.post(url + "/get_reward", json=payload))  # noqa: E731
                tasks = [post()]
                await until(lambda: batcher.stats.submitted == 1 and batcher.queued == 0, "first request in the model")
                tasks += [post() for _ in range(5)]
                await until(lambda: app.state.admission.in_use == 2 and len(app.state.admission._waiters) == 4, "4 waiting")
                release.set()
                return await asyncio.gather(*tasks)

        accepted = asyncio.run(burst())
    assert [r.status_code for r in accepted] == [200] * 6, "over capacity, requests wait instead of 503"
    assert all(json.loads(r.content)["rewards"] == -3.0 for r in accepted)
    assert batcher.stats.rejected == 0



def test_admission_is_first_come_first_served_and_bounded():
    from openrlhf_ext.server_app import Admission

    async def scenario():
        gate = Admission(3)
        assert await gate.acquire(2, 0.1)
        order = []

        async def waiter(name, n, timeout):
            ok = await gate.acquire(n, timeout)
            order.append((name, ok))

        big = asyncio.create_task(waiter("big", 2, 5))
        await asyncio.sleep(0.05)
        small = asyncio.create_task(waiter("small", 1, 5))
        late = asyncio.create_task(waiter("late", 3, 0.1))
        await asyncio.sleep(0.3)
        assert order == [("late", False)], "room for 1 is free, yet the small request waits behind the big one"
        gate.release(2)
        await asyncio.gather(big, small)
        return order, gate.in_use

    order, in_use = asyncio.run(scenario())
    assert order == [("late", False), ("big", True), ("small", True)] and in_use == 3


def test_timeout_answers_a_retryable_error_in_time_instead_of_a_reward():
    scorer = _rule_scorer(penalty=-7.0)
    release = threading.Event()
    scorer.score = lambda samples: (release.wait(timeout=20), [])[1]
    with serve_in_thread(create_app(scorer, ServerSettings(request_timeout_s=0.3))) as url:
        started = time.monotonic()
        reply = httpx.post(url + "/get_reward", json={"query": ["pabc"], "prompts": ["p"]}, timeout=10)
        elapsed = time.monotonic() - started
        release.set()
    assert reply.status_code == 200 and elapsed < 2.0, "answered when the request timeout ran out"
    body = reply.json()
    assert body["rewards"] is None and body["errors"][0]["code"] == "timeout" and body["errors"][0]["retry"] is True
    assert body["extra_logs"]["reward/errors"] == 1.0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serves_with_env_token_and_rejects_bad_config(tmp_path):
    import os
    import subprocess
    import sys
    import time

    bad = tmp_path / "bad.yaml"
    bad.write_text("reward:\n  type: length_penalty\n  coef: -1\n")
    failed = subprocess.run([sys.executable, "-m", "openrlhf_ext.serve", "--config", str(bad)], capture_output=True, text=True)
    assert failed.returncode == 2 and f"{bad}:3: reward.coef" in failed.stderr and "Traceback" not in failed.stderr

    good = tmp_path / "chars.yaml"
    good.write_text("reward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n")
    port = _free_port()
    env = dict(os.environ, REWARD_SERVER_TOKEN="tok")
    cmd = [sys.executable, "-m", "openrlhf_ext.serve", "--config", str(good), "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.1)
        payload = {"query": ["pabcd"], "prompts": ["p"], "labels": [{"id": 1}]}
        assert httpx.post(url + "/get_reward", json=payload).status_code == 401
        reply = httpx.post(url + "/get_reward", json=payload, headers={"Authorization": "Bearer tok"})
        assert reply.status_code == 200 and reply.json()["rewards"] == -4.0
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_openrlhf_round_robins_over_several_servers(tokenizer_dir):
    apps = [create_app(_rule_scorer()), create_app(_rule_scorer())]
    pairs = [(PROMPTS[i % 4], RESPONSES[i % 4]) for i in range(8)]
    tokenizer, engine, prompts = make_engine(tokenizer_dir, pairs)
    with serve_in_thread(apps[0]) as first, serve_in_thread(apps[1]) as second:
        executor = SingleTurnAgentExecutor(remote_rm_url=[first + "/get_reward", second + "/get_reward"])

        async def all_samples():
            return await asyncio.gather(*(executor.execute(p, None, sampling_params(), 256, tokenizer, engine) for p in prompts))

        outputs = asyncio.run(all_samples())
    expected = [-float(len(response)) for _, response in pairs]
    assert [o["reward"] for o in outputs] == expected, "chars penalty of each response, derived from the query"
    assert [app.state.batcher.stats.delivered for app in apps] == [4, 4]


def test_results_outside_float32_become_error_samples():
    config = parse_pipeline_config({"reward": {"type": "length_penalty", "coef": 1e38, "unit": "chars"}})
    with serve_in_thread(create_app(GuardedScorer(build_pipeline(config)))) as url:
        reply = httpx.post(url + "/get_reward", json={"query": ["pa", "pabcd"], "prompts": ["p"] * 2})
    assert reply.status_code == 200, "an infinite reward cannot be encoded in JSON: it must not reach the encoder"
    body = reply.json()
    assert body["rewards"] == [-1e38, None], "-4e38 is finite in float64 but -inf in OpenRLHF's float32 tensor"
    assert [e and e["code"] for e in body["errors"]] == [None, "non_finite"]
    assert body["extra_logs"]["reward/errors"] == [0.0, 1.0]


def test_vrcli_label_values_are_validated_by_the_plugin(models_env, tmp_path):
    shipped = Path("configs/rewards/vrcli.yaml").read_text()
    config = tmp_path / "vrcli_plain_labels.yaml"
    config.write_text(shipped.replace("fingerprint: require", "fingerprint: off").replace("layout: paper", "layout: append"))
    scorer = GuardedScorer(build_pipeline(load_pipeline_config(config)))
    label = {"context": "Write the next chapter about the dragon.", "gold": "She opened the door and smiled at the sea."}
    prompt = "<|user|>Plan the chapter.<eos><|assistant|>"
    query = prompt + "In summary: the dragon flies to the sea and meets a ship.<eos>"
    values = [50.0, 1e308, True, "50", 10**400, -1.0]
    payload = json.dumps({"query": [query] * len(values), "prompts": [prompt] * len(values),
                          "labels": [{**label, "baseline_ppl": v} for v in values]})
    with serve_in_thread(create_app(scorer)) as url:
        reply = httpx.post(url + "/get_reward", content=payload, headers={"Content-Type": "application/json"})
    assert reply.status_code == 200
    errors = reply.json()["extra_logs"]["reward/errors"]
    rewards = reply.json()["rewards"]
    assert errors[0] == 0.0 and errors[2:] == [1.0] * 4, "bool, string, overflowing and negative baselines are errors"
    assert rewards[2:] == [None] * 4 and [e["code"] for e in reply.json()["errors"][2:]] == ["plugin_error"] * 4
    assert all(np.isfinite([r for r in rewards if r is not None]))


def test_torch_threads_and_finite_fallback(tmp_path, capsys):
    import torch

    from openrlhf_ext import serve

    before = torch.get_num_threads()
    try:
        assert serve.torch_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit, match="--torch-threads must be >= 1"):
        serve.torch_threads(0)
    config = tmp_path / "chars.yaml"
    config.write_text("reward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n")
    with pytest.raises(SystemExit, match="^2$"):
        serve.main(["--config", str(config), "--fallback-reward", "-1", "--torch-threads", str(before)])
    assert "--fallback-reward is not accepted: the server no longer answers a fallback" in capsys.readouterr().err


def test_slow_headers_are_closed_and_slow_bodies_get_408():
    import socket
    import time

    settings = ServerSettings(header_timeout_s=0.5, body_timeout_s=0.5)
    with serve_in_thread(create_app(_rule_scorer(), settings), settings=settings) as url:
        port = int(url.rsplit(":", 1)[1])
        half_open = socket.create_connection(("127.0.0.1", port))
        half_open.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\n")
        slow_body = socket.create_connection(("127.0.0.1", port))
        slow_body.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"query\":")
        time.sleep(1.5)
        half_open.settimeout(5)
        slow_body.settimeout(5)
        assert half_open.recv(100) == b"", "a connection without complete headers is closed"
        assert slow_body.recv(100).startswith(b"HTTP/1.1 408")
        half_open.close()
        slow_body.close()
        assert httpx.post(url + "/get_reward", json={"query": ["pab"], "prompts": ["p"]}).json()["rewards"] == -2.0
