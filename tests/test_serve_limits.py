"""The reward server under load, without replicas, with large bodies, and how it takes its token."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import chars_scorer

from openrlhf_ext.server_app import ServerSettings, create_app, serve_in_thread


def test_overload_is_refused_with_429_before_the_work_would_time_out():
    scorer = chars_scorer()
    real = scorer.score
    scorer.score = lambda samples: (time.sleep(0.2 * len(samples)), real(samples))[1]
    settings = ServerSettings(max_batch_size=1, max_wait_ms=0, request_timeout_s=1.0)
    app = create_app(scorer, settings)
    payload = {"query": ["pabc"], "prompts": ["p"]}

    async def burst(url):
        async with httpx.AsyncClient(timeout=30) as client:
            await client.post(url + "/get_reward", json=payload)  # times the model: 0.2 s a sample

            async def timed():
                started = time.monotonic()
                reply = await client.post(url + "/get_reward", json=payload)
                return reply, time.monotonic() - started

            return await asyncio.gather(*(timed() for _ in range(12)))

    with serve_in_thread(app) as url:
        answers = asyncio.run(burst(url))
    scored = [(r, s) for r, s in answers if r.status_code == 200]
    refused = [(r, s) for r, s in answers if r.status_code == 429]
    assert len(scored) + len(refused) == 12 and 2 <= len(scored) <= 6, [r.status_code for r, _ in answers]
    assert all(r.json()["rewards"] == -3.0 and r.json()["errors"] == [None] for r, _ in scored), "no timeouts, no fallback"
    assert all(s < 0.5 and int(r.headers["Retry-After"]) >= 1 for r, s in refused), "refused at once, with a hint"
    assert all(s <= 1.2 for _, s in answers), "every answer within the announced request timeout"


def test_no_live_replica_means_503_for_health_and_requests():
    reason = {"now": None}
    app = create_app(chars_scorer(), ServerSettings(token="tok"), health=lambda: reason["now"])
    auth = {"Authorization": "Bearer tok"}
    payload = {"query": ["pabc"], "prompts": ["p"]}
    with serve_in_thread(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        reason["now"] = "rm: no live replica (1 restarting, 0 gone for good, max_restarts 3)"
        down = httpx.get(url + "/health")
        assert down.status_code == 503 and down.json() == {"status": "unavailable"}
        assert httpx.get(url + "/health", headers=auth).json()["reason"].startswith("rm: no live replica")
        refused = httpx.post(url + "/get_reward", json=payload, headers=auth)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        reason["now"] = None
        assert httpx.post(url + "/get_reward", json=payload, headers=auth).json()["rewards"] == -3.0


def test_large_bodies_are_parsed_off_the_event_loop_and_health_stays_fast(monkeypatch):
    """/health's slowest answer while two 5 MB bodies (600k small label objects each) are read, against the same
    server parsing them on the event loop (a ratio, so that the machine's load cancels out)."""
    from openrlhf_ext import server_app

    settings = ServerSettings(max_body_bytes=16 * 1024 * 1024)
    body = json.dumps({"query": ["pabc"], "prompts": ["p"], "labels": [[{"a": 1}] * 600_000]}).encode()
    headers = {"Content-Type": "application/json"}

    async def measure(url):
        async with httpx.AsyncClient(timeout=120) as client:
            posts = [asyncio.create_task(client.post(url + "/get_reward", content=body, headers=headers)) for _ in range(2)]
            await asyncio.sleep(0.2)
            worst = 0.0
            while not all(p.done() for p in posts):
                before = time.monotonic()
                assert (await client.get(url + "/health")).status_code == 200
                worst = max(worst, time.monotonic() - before)
                await asyncio.sleep(0.02)
            replies = [await p for p in posts]
            assert [r.json()["rewards"] for r in replies] == [-3.0, -3.0]
            return worst

    def slowest_health(threshold: int) -> float:
        monkeypatch.setattr(server_app, "INLINE_PARSE_BYTES", threshold)
        with serve_in_thread(create_app(chars_scorer(), settings)) as url:
            return asyncio.run(measure(url))

    gc.freeze()  # as `serve` does after start-up: the test process's own heap must not add full-collection pauses
    try:  # two rounds, interleaved, the best of each: one stall of a loaded machine cannot decide the ratio
        default = server_app.INLINE_PARSE_BYTES
        rounds = [(slowest_health(default), slowest_health(1 << 40)) for _ in range(2)]
    finally:
        gc.unfreeze()
    threaded, inline = (min(times) for times in zip(*rounds))
    assert inline > 0.5, f"parsed on the event loop, the bodies must stall /health for this test to mean anything ({inline:.2f} s)"
    assert threaded < 0.6 * inline, f"/health took {threaded:.2f} s with the parsing thread, {inline:.2f} s without"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_token_comes_from_a_file_or_the_environment_never_the_command_line(tmp_path, capsys):
    from openrlhf_ext import serve as serve_module

    config = tmp_path / "chars.yaml"
    config.write_text("on_error: penalty\nerror_penalty: -1\nreward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n")
    serve = [sys.executable, "-m", "openrlhf_ext.serve", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "REWARD_SERVER_TOKEN"}
    with pytest.raises(SystemExit, match="^2$"):
        serve_module.parse_args(["--config", str(config), "--token", "cli-secret-1"])
    refused = capsys.readouterr()
    assert "--token is not accepted" in refused.err and "REWARD_SERVER_TOKEN" in refused.err
    assert "cli-secret-1" not in refused.err + refused.out

    skip = tmp_path / "skip.yaml"
    skip.write_text("on_error: skip\nreward:\n  type: length_penalty\n  coef: 1.0\n  unit: chars\n")
    with pytest.raises(SystemExit, match="^2$"):
        serve_module.main(["--config", str(skip), "--torch-threads", "1"])
    assert f"{skip}: on_error: skip cannot be used with OpenRLHF 0.11.2" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit, match="^2$"):
        serve_module.main(["--config", str(config), "--token-file", str(tmp_path / "empty"), "--torch-threads", "1"])
    assert f"--token-file names {tmp_path / 'empty'}, which is empty" in capsys.readouterr().err

    secret = "file-secret-42"
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    token_file.chmod(0o600)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*serve, "--port", str(port), "--token-file", str(token_file), "--log-level", "info"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(1200):
            try:
                health = httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None
                time.sleep(0.1)
        payload = {"query": ["pabcd"], "prompts": ["p"]}
        assert httpx.post(url + "/get_reward", json=payload).status_code == 401
        reply = httpx.post(url + "/get_reward", json=payload, headers={"Authorization": f"Bearer {secret}"})
        assert reply.status_code == 200 and reply.json()["rewards"] == -4.0
        detail = httpx.get(url + "/health", headers={"Authorization": f"Bearer {secret}"}).text
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert secret not in ps and secret not in health.text and secret not in detail
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert secret not in output and "token required" in output
