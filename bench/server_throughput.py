"""Reward-server benchmark: ours against OpenRLHF's own `serve_rm`, plus fault and bad-input runs.

    python bench/server_throughput.py                                  # all modes
    python bench/server_throughput.py --mode throughput --rounds 3 --duration 10
    python bench/server_throughput.py --mode fault --fault-duration 20 --restart-delay 20
    python bench/server_throughput.py --mode battery

throughput: 64 concurrent clients against one tiny random RM served (a) by `python -m openrlhf_ext.serve`
  and (b) by the real `openrlhf.cli.serve_rm` (run on CPU with the flash_attn/vllm stand-ins and
  `--ds.attn_implementation eager`; it loads the model in bf16, its only CPU-capable choice), interleaved
  round by round. Every request is a distinct text, and every answer is checked against the reward computed
  directly for its own text (ours exactly; serve_rm within bf16 precision), so swapped or duplicated answers
  show up as wrong. Prints req/s, p50/p99 and the ratio.
fault: rollouts through OpenRLHF 0.11.2's real `SingleTurnAgentExecutor` with its own HTTP client and with
  ours (`openrlhf_ext.hooks.install()`), interleaved: (1) overload, 4x more concurrent rollouts than the
  server admits (--max-queue); (2) issue 17's overload: 600 concurrent rollouts against the default queue with
  `--request-timeout 5`; (3) the server killed with SIGKILL and restarted after --restart-delay s.
  Counts samples that ended without a reward, wrong rewards (and among them valid samples given the
  config's error penalty), clean stops, and the server's 5xx answers.
battery: the hostile inputs of issues 9 and 17 sent to our server; prints each status (5xx must be 0), the
  422 answer size, the slowest /health during a large prompt search and during eight ~6 MB bodies at once,
  and how many half-open connections are still open after the header timeout.
Everything binds to 127.0.0.1; every loop is bounded by its duration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the quick brown fox jumps over lazy dog dragon paint storm harbour ship reward model policy answer "
    "question chapter hero village map light sea door morning apple banana cherry"
).split()


# ---------------------------------------------------------------- models, config and request texts


def build_models(out: Path, hidden: int, layers: int) -> Path:
    from reward_plugins import tiny_models

    tokenizer = tiny_models.build_tokenizer(out / "tokenizer")
    sizes = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers)
    return tiny_models.build_reward_model(out / "rm", tokenizer, seed=1, **sizes)


def write_config(out: Path, model: Path, batch: int, max_len: int, dtype: str = "float32") -> Path:
    """One RM scoring the whole query (prompt + response), the text serve_rm scores."""
    config = out / "rm.yaml"
    config.write_text(
        "on_error: penalty\nerror_penalty: -1.0\nreward:\n  type: reward_model\n  name: rm\n"
        f"  path: {model}\n  template: '{{prompt}}{{response}}'\n  max_length: {max_len}\n"
        f"  truncation_side: left\n  batch_size: {batch}\n  dtype: {dtype}\n  device: cpu\n"
    )
    return config


def make_requests(n: int, seed: int = 0) -> list[dict]:
    """n distinct one-sample OpenRLHF payloads (chat-templated prompt, query = prompt + response)."""
    rng = np.random.default_rng(seed)
    payloads = []
    for i in range(n):
        prompt = f"<|user|>Question {i}: " + " ".join(rng.choice(WORDS, 8)) + "<eos><|assistant|>"
        response = " ".join(rng.choice(WORDS, int(rng.integers(6, 30)))) + "<eos>"
        payloads.append({"query": [prompt + response], "prompts": [prompt], "labels": [{"id": i}]})
    return payloads


def make_scorer(config: Path):
    from openrlhf_ext.server_protocol import GuardedScorer
    from reward_plugins import build_pipeline, load_pipeline_config

    return GuardedScorer(build_pipeline(load_pipeline_config(config)))


def expected_rewards(config: Path, payloads: list[dict]) -> np.ndarray:
    scorer = make_scorer(config)
    outcomes = scorer.score_raw([p["query"][0] for p in payloads], [p["prompts"][0] for p in payloads], None)
    return np.array([o.reward for o in outcomes])


# ---------------------------------------------------------------- servers as subprocesses


def run_serve_rm(argv: list[str]) -> None:
    """OpenRLHF's serve_rm main, with the CPU stand-ins for flash_attn/vllm installed first."""
    import runpy

    sys.path.insert(0, str(ROOT / "tests"))
    import openrlhf_stand_ins

    openrlhf_stand_ins.install()
    sys.argv = ["openrlhf.cli.serve_rm", *argv]
    runpy.run_module("openrlhf.cli.serve_rm", run_name="__main__", alter_sys=True)


@dataclass
class Server:
    kind: str  # "ours" (from `root`) or "serve_rm"
    port: int
    args: list[str]
    threads: int
    proc: subprocess.Popen | None = None
    root: Path = ROOT

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        if self.kind == "ours":
            cmd = [sys.executable, "-m", "openrlhf_ext.serve", "--host", HOST, "--port", str(self.port),
                   "--torch-threads", str(self.threads), "--log-level", "warning", *self.args]
        else:
            cmd = [sys.executable, __file__, "--serve-rm", "--", "--host", HOST, "--port", str(self.port), *self.args]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), PYTHONPATH=str(self.root))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, cwd=self.root)

    def wait_ready(self, timeout: float = 300.0) -> float:
        import httpx

        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}")
            try:
                probe = {"query": ["<|user|>hi<eos><|assistant|>ok<eos>"], "prompts": ["<|user|>hi<eos><|assistant|>"]}
                if httpx.post(self.url + "/get_reward", json=probe, timeout=5.0).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.kind} server not ready after {timeout} s")

    def statuses(self) -> Counter:
        import httpx

        return Counter(httpx.get(self.url + "/health", timeout=10.0).json().get("statuses", {}))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


# ---------------------------------------------------------------- throughput


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    answered: int = 0
    wrong: int = 0
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")


async def run_clients(url: str, payloads: list[dict], expected: np.ndarray, clients: int, duration: float,
                      tolerance, start_index: int, tally: Tally) -> int:
    """`clients` loops posting distinct one-sample requests for `duration` s; returns the next payload index."""
    deadline = time.monotonic() + duration
    counter = iter(range(start_index, 10**12))
    last = [start_index]
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def one_client() -> None:
            while time.monotonic() < deadline:
                index = next(counter)
                last[0] = max(last[0], index + 1)
                payload = payloads[index % len(payloads)]
                start = time.monotonic()
                try:
                    async with session.post(url + "/get_reward", json=payload) as response:
                        tally.statuses[response.status] += 1
                        body = await response.json(content_type=None) if response.status == 200 else None
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    tally.errors[type(exc).__name__] += 1
                    continue
                if body is None:
                    continue
                tally.answered += 1
                tally.latencies.append(time.monotonic() - start)
                reward = body["rewards"][0] if isinstance(body["rewards"], list) else body["rewards"]
                if not tolerance(reward, expected[index % len(payloads)]):
                    tally.wrong += 1

        started = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        tally.seconds += time.monotonic() - started
    return last[0]


def throughput(args, work: Path, model: Path) -> None:
    config = write_config(work, model, args.member_batch_size, args.max_len, args.dtype)
    payloads = make_requests(args.distinct)
    expected = expected_rewards(config, payloads)
    ours_args = ["--config", str(config), "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    servers = {
        "ours": Server("ours", args.port, ours_args, args.torch_threads),
        "serve_rm": Server("serve_rm", args.port + 1, ["--reward.model_name_or_path", str(model), "--ds.attn_implementation",
                                                       "eager", "--data.max_len", str(args.max_len)], args.torch_threads),
    }
    if args.compare_tree:
        servers["compare"] = Server("ours", args.port + 6, ours_args, args.torch_threads, root=Path(args.compare_tree).resolve())
    exact = lambda got, want: abs(got - want) <= (1e-3 if args.dtype == "float32" else 0.02 * abs(want) + 0.1)  # noqa: E731
    bf16 = lambda got, want: abs(got - want) <= 0.02 * abs(want) + 0.1  # noqa: E731
    tallies = {kind: Tally() for kind in servers}
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_ready()
        index = 0
        kinds = list(servers)
        for kind in kinds:
            index = asyncio.run(run_clients(servers[kind].url, payloads, expected, args.clients, 2.0,
                                            bf16 if kind == "serve_rm" else exact, index, Tally()))
        for round_ in range(args.rounds):
            for kind in kinds[round_ % len(kinds):] + kinds[: round_ % len(kinds)]:
                index = asyncio.run(run_clients(servers[kind].url, payloads, expected, args.clients, args.duration,
                                                bf16 if kind == "serve_rm" else exact, index, tallies[kind]))
    finally:
        for server in servers.values():
            server.stop()
    print(f"\nthroughput: {args.clients} concurrent clients, {args.rounds} interleaved rounds of {args.duration:g} s "
          f"per server, one tiny RM (hidden {args.hidden}, {args.layers} layers), CPU only, {os.cpu_count()} cores "
          f"shared with other jobs, OMP/torch threads {args.torch_threads} for both; {index} distinct requests sent")
    print(f"{'server':<46}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-200':>9}{'wrong':>7}")
    labels = {"ours": f"openrlhf_ext.serve (batch<={args.max_batch_size}, wait {args.max_wait_ms:g} ms, {args.dtype})",
              "serve_rm": "openrlhf.cli.serve_rm (eager, bf16)", "compare": f"openrlhf_ext.serve from {args.compare_tree}"}
    for kind, tally in tallies.items():
        bad = sum(v for k, v in tally.statuses.items() if k != 200) + sum(tally.errors.values())
        rps = tally.answered / max(tally.seconds, 1e-9)
        print(f"{labels[kind]:<46}{rps:>9.1f}{tally.percentile(50):>9.1f}{tally.percentile(99):>9.1f}{bad:>9}{tally.wrong:>7}")
    rate = {kind: t.answered / max(t.seconds, 1e-9) for kind, t in tallies.items()}
    print(f"ratio ours / serve_rm: {rate['ours'] / max(rate['serve_rm'], 1e-9):.1f}x req/s; "
          f"p99 {tallies['ours'].percentile(99):.0f} ms vs {tallies['serve_rm'].percentile(99):.0f} ms")
    if "compare" in rate:
        print(f"ratio ours / {args.compare_tree}: {rate['ours'] / max(rate['compare'], 1e-9):.2f}x req/s; "
              f"{args.compare_tree} / serve_rm: {rate['compare'] / max(rate['serve_rm'], 1e-9):.1f}x")


# ---------------------------------------------------------------- fault runs through OpenRLHF's executor


PENALTY = -1.0  # the error_penalty of write_config's YAML


@dataclass
class RolloutTally:
    rollouts: int = 0
    no_reward: int = 0
    wrong: int = 0
    penalised: int = 0
    stopped: int = 0
    first_stop: str = ""


def rollout_setup(work: Path, model: Path, n: int):
    sys.path.insert(0, str(ROOT / "tests"))
    from serve_helpers import PROMPTS, RESPONSES, make_engine

    from reward_plugins import Sample

    pairs = [(PROMPTS[i % 4] + f" Case {i}.", RESPONSES[i % 4]) for i in range(n)]
    tokenizer, engine, prompts = make_engine(model, pairs)
    config = write_config(work, model, 16, 256)
    direct = make_scorer(config).pipeline.score([Sample(p, r) for p, (_, r) in zip(prompts, pairs)])
    return config, tokenizer, engine, prompts, np.array(direct.rewards, dtype=float)


async def run_rollouts(url: str, client: str, tokenizer, engine, prompts, expected, loops: int, duration: float,
                       tally: RolloutTally) -> None:
    """`loops` rollout loops through OpenRLHF's executor for `duration` s, with its own client or ours."""
    from openrlhf.utils import agent

    from openrlhf_ext import reward_client

    sys.path.insert(0, str(ROOT / "tests"))
    from serve_helpers import sampling_params

    original = getattr(agent.SingleTurnAgentExecutor, "_openrlhf_fetch", None)
    if original is None:
        original = agent.SingleTurnAgentExecutor._fetch_rewards_via_http
        agent.SingleTurnAgentExecutor._openrlhf_fetch = original
    agent.SingleTurnAgentExecutor._fetch_rewards_via_http = (
        reward_client.fetch_rewards_via_http if client == "ours" else original
    )
    reward_client._BOOK = reward_client.ServerBook()  # each run starts knowing nothing about its server
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=[url + "/get_reward"])
    deadline = time.monotonic() + duration
    counter = iter(range(10**12))

    async def loop() -> None:
        while time.monotonic() < deadline:
            i = next(counter) % len(prompts)
            tally.rollouts += 1
            try:
                out = await executor.execute(prompts[i], None, sampling_params(), 256, tokenizer, engine)
            except reward_client.RewardClientError as exc:
                tally.stopped += 1
                tally.first_stop = tally.first_stop or str(exc)
                return
            if out["reward"] is None:
                tally.no_reward += 1
            elif abs(float(out["reward"]) - expected[i]) > 1e-3:
                tally.wrong += 1
                tally.penalised += abs(float(out["reward"]) - PENALTY) < 1e-6

    await asyncio.gather(*(loop() for _ in range(loops)))


def fault(args, work: Path, model: Path) -> None:
    import logging

    logging.getLogger("openrlhf_ext.reward_client").setLevel(logging.ERROR)
    os.environ["REWARD_CLIENT_TIMEOUT_S"] = str(args.client_budget)
    config, tokenizer, engine, prompts, expected = rollout_setup(work, model, 256)
    rows = []
    capacity = args.fault_capacity
    for client in ("openrlhf", "ours"):
        server = Server("ours", args.port + 2, ["--config", str(config), "--max-queue", str(capacity),
                                                "--max-batch-size", str(capacity), "--request-timeout", "2"],
                        args.torch_threads)
        server.start()
        server.wait_ready()
        tally = RolloutTally()
        try:
            asyncio.run(run_rollouts(server.url, client, tokenizer, engine, prompts, expected, 4 * capacity,
                                     args.fault_duration, tally))
            statuses = server.statuses()
        finally:
            server.stop()
        rows.append((f"overload 4x (max-queue {capacity}, {4 * capacity} rollouts)", client, tally, statuses))

        server = Server("ours", args.port + 5, ["--config", str(config), "--request-timeout", "5"], args.torch_threads)
        server.start()
        server.wait_ready()
        tally = RolloutTally()
        try:
            asyncio.run(run_rollouts(server.url, client, tokenizer, engine, prompts, expected, 600,
                                     args.fault_duration, tally))
            statuses = server.statuses()
        finally:
            server.stop()
        rows.append(("600 concurrent rollouts, --request-timeout 5", client, tally, statuses))

        server = Server("ours", args.port + 3, ["--config", str(config)], args.torch_threads)
        server.start()
        server.wait_ready()
        tally, statuses, events = RolloutTally(), Counter(), {}

        async def with_kill() -> None:
            async def killer() -> None:
                await asyncio.sleep(5.0)
                statuses.update(await asyncio.to_thread(server.statuses))
                server.kill()
                events["killed"] = time.monotonic()
                await asyncio.sleep(args.restart_delay)
                server.start()
                await asyncio.to_thread(server.wait_ready)
                events["back_s"] = time.monotonic() - events["killed"]

            await asyncio.gather(killer(), run_rollouts(server.url, client, tokenizer, engine, prompts, expected,
                                                        args.fault_loops, args.fault_duration + args.restart_delay + 10,
                                                        tally))

        try:
            asyncio.run(with_kill())
            statuses.update(server.statuses())
        finally:
            server.stop()
        rows.append((f"kill -9, restart after {args.restart_delay:g} s (back in {events.get('back_s', float('nan')):.0f} s)",
                     client, tally, statuses))
    print(f"\nfault: rollouts through OpenRLHF 0.11.2's SingleTurnAgentExecutor, its own client vs ours "
          f"(budget {args.client_budget:g} s); CPU only, shared cores")
    print(f"{'scenario':<58}{'client':<10}{'rollouts':>9}{'no reward':>10}{'wrong':>7}{'penalised':>10}"
          f"{'stopped':>8}{'429':>6}{'5xx':>6}")
    for scenario, client, tally, statuses in rows:
        five = sum(v for k, v in statuses.items() if str(k).startswith("5"))
        print(f"{scenario:<58}{client:<10}{tally.rollouts:>9}{tally.no_reward:>10}{tally.wrong:>7}{tally.penalised:>10}"
              f"{tally.stopped:>8}{statuses.get('429', 0):>6}{five:>6}")
        if tally.first_stop:
            print(f"    stop message: {tally.first_stop[:200]}")


# ---------------------------------------------------------------- bad-input battery


async def health_during_bodies(base: str, count: int) -> float:
    """The slowest /health answer while `count` ~6 MB bodies (700k small label objects each) are being read."""
    import httpx

    heavy = json.dumps({"query": ["<|user|>hi<eos><|assistant|>ok<eos>"], "prompts": ["<|user|>hi<eos><|assistant|>"],
                        "labels": [[{"a": 1}] * 700_000]})
    async with httpx.AsyncClient(timeout=300) as client:
        tasks = [asyncio.create_task(client.post(base + "/get_reward", content=heavy,
                                                 headers={"Content-Type": "application/json"})) for _ in range(count)]
        await asyncio.sleep(0.05)
        worst = 0.0
        while not all(t.done() for t in tasks):
            start = time.monotonic()
            await client.get(base + "/health")
            worst = max(worst, time.monotonic() - start)
            await asyncio.sleep(0.02)
        for task in tasks:
            await task
        return worst


def battery(args, work: Path, model: Path) -> None:
    import httpx

    config = write_config(work, model, 16, 256)
    server = Server("ours", args.port + 4, ["--config", str(config), "--header-timeout", "3"], args.torch_threads)
    server.start()
    server.wait_ready()
    url = server.url + "/get_reward"
    as_json = {"Content-Type": "application/json"}
    ok = {"query": ["<|user|>hi<eos><|assistant|>yes<eos>"], "prompts": ["<|user|>hi<eos><|assistant|>"]}
    cases = {
        "invalid UTF-8": (b'{"query": ["\xff\xfe"]}', as_json),
        "labels nested 5000 deep": (b'{"query": ["a"], "labels": [' + b"[" * 5000 + b"]" * 5000 + b"]}", as_json),
        "text/plain POST": (json.dumps(ok).encode(), {"Content-Type": "text/plain"}),
        "NaN label": (b'{"query": ["a"], "labels": [NaN]}', as_json),
        "1 MB of wrong types (422)": (json.dumps({"query": [1] * 200_000}).encode(), as_json),
        "2 MB sample (over the size cap)": (json.dumps({"query": ["p" + "x" * 2_000_000], "prompts": ["p"]}).encode(), as_json),
    }
    results, five = [], 0
    try:
        with httpx.Client(timeout=120) as client:
            for name, (body, headers) in cases.items():
                start = time.monotonic()
                reply = client.post(url, content=body, headers=headers)
                five += reply.status_code >= 500
                body = reply.json()
                detail = body.get("error", "") if reply.status_code != 200 else f"errors={[e and e['code'] for e in body['errors']]}"
                results.append((name, reply.status_code, len(reply.content), time.monotonic() - start, detail[:70]))

            async def health_during_big() -> tuple[float, float]:
                big = json.dumps({"query": ["<|user|>" + "y" * 200_000 + "z"], "prompts": ["<|user|>" + "y" * 200_000]})
                async with httpx.AsyncClient(timeout=120) as aclient:
                    task = asyncio.create_task(aclient.post(url, content=big, headers=as_json))
                    await asyncio.sleep(0.05)
                    worst = 0.0
                    while not task.done():
                        start = time.monotonic()
                        await aclient.get(server.url + "/health")
                        worst = max(worst, time.monotonic() - start)
                        await asyncio.sleep(0.02)
                    start = time.monotonic()
                    await task
                    return worst, time.monotonic() - start

            worst_health, _ = asyncio.run(health_during_big())

            worst_bodies = asyncio.run(health_during_bodies(server.url, 8))
        sockets = []
        for _ in range(200):
            sock = socket.create_connection((HOST, server.port))
            sock.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\n")
            sockets.append(sock)
        time.sleep(4.5)
        still_open = 0
        for sock in sockets:
            sock.settimeout(0.5)
            try:
                still_open += sock.recv(1) != b""
            except (socket.timeout, BlockingIOError):
                still_open += 1
            except OSError:
                pass
            sock.close()
        statuses = server.statuses()
    finally:
        server.stop()
    print("\nbattery: hostile inputs against openrlhf_ext.serve (CPU only, shared cores)")
    print(f"{'input':<34}{'status':>7}{'bytes':>8}{'s':>7}  detail")
    for name, status, size, seconds, detail in results:
        print(f"{name:<34}{status:>7}{size:>8}{seconds:>7.2f}  {detail}")
    print(f"slowest /health while a 200k-character prompt search ran: {worst_health * 1000:.0f} ms")
    print(f"slowest /health while eight ~6 MB bodies were parsed at once: {worst_bodies * 1000:.0f} ms")
    if args.compare_tree:
        old = Server("ours", args.port + 7, ["--config", str(config)], args.torch_threads, root=Path(args.compare_tree))
        old.start()
        old.wait_ready()
        try:
            worst_old = asyncio.run(health_during_bodies(old.url, 8))
        finally:
            old.stop()
        print(f"the same, openrlhf_ext.serve from {args.compare_tree}: {worst_old * 1000:.0f} ms")
    print(f"half-open connections still open 4.5 s after sending partial headers (header timeout 3 s): {still_open} of 200")
    print(f"5xx answers in the battery: {five}; all statuses the server counted: {dict(statuses)}")


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["--serve-rm"]:
        run_serve_rm(raw[2:] if raw[1:2] == ["--"] else raw[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["throughput", "fault", "battery", "all"], default="all")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per server per round")
    parser.add_argument("--fault-capacity", type=int, default=16, help="--max-queue of the overload run")
    parser.add_argument("--fault-loops", type=int, default=32, help="concurrent rollouts in the kill run")
    parser.add_argument("--fault-duration", type=float, default=20.0)
    parser.add_argument("--restart-delay", type=float, default=20.0)
    parser.add_argument("--client-budget", type=float, default=600.0, help="REWARD_CLIENT_TIMEOUT_S for our client")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--member-batch-size", type=int, default=64, help="the RM's forward batch inside a server batch")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="our server's model dtype (serve_rm always loads bf16); float32 answers are checked exactly")
    parser.add_argument("--hidden", type=int, default=32, help="hidden size of the random RM")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch/OMP threads of every server")
    parser.add_argument("--distinct", type=int, default=8192, help="distinct request texts")
    parser.add_argument("--port", type=int, default=5917)
    parser.add_argument("--compare-tree", default=None, metavar="DIR",
                        help="also serve openrlhf_ext from this source tree (e.g. `git worktree add /tmp/old main`), "
                        "interleaved with the others, to compare two versions of our server")
    parser.add_argument("--work-dir", default=None, help="where to build the models (default: a temp dir)")
    args = parser.parse_args(raw)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        model = build_models(work / "models", args.hidden, args.layers)
        if args.mode in ("throughput", "all"):
            throughput(args, work, model)
        if args.mode in ("battery", "all"):
            battery(args, work, model)
        if args.mode in ("fault", "all"):
            fault(args, work, model)


if __name__ == "__main__":
    main()
