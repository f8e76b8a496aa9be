"""Reward-server benchmark: our batching server against one-request-at-a-time, plus load and fault runs.

    python bench/server_throughput.py                       # all three modes, default durations
    python bench/server_throughput.py --mode throughput --duration 10
    python bench/server_throughput.py --mode load --load-clients 256 --load-duration 60
    python bench/server_throughput.py --mode fault --fault-duration 30

throughput: 64 concurrent clients for --duration seconds against a 5-member ensemble of tiny random RMs,
  (a) `python -m openrlhf_ext.serve` (dynamic batching) and (b) a server like OpenRLHF's serve_rm (the
  model runs synchronously inside the async handler, one sample per forward); prints req/s, p50/p99 and
  the ratio. Both servers answer with the same GuardedScorer, so only the scheduling differs.
load: 256 clients for 60 s; every answer is checked against the reward computed directly for its text,
  and the server's delivered count against the client's sent count (lost or duplicated must be 0).
fault: clients retry like OpenRLHF (5 attempts, 1 s apart); the server is killed (SIGKILL) and restarted
  mid-run; prints what the clients saw.
Everything binds to 127.0.0.1; every loop is bounded by its duration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from fastapi import FastAPI, Request

HOST = "127.0.0.1"
WORDS = (
    "the quick brown fox jumps over lazy dog dragon paint storm harbour ship reward model policy answer "
    "question chapter hero village map light sea door morning apple banana cherry"
).split()


# ---------------------------------------------------------------- models, config and request texts


def build_models(out: Path, hidden: int, layers: int) -> None:
    from reward_plugins import tiny_models

    tokenizer = tiny_models.build_tokenizer(out / "tokenizer")
    sizes = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers)
    for seed in range(1, 6):
        tiny_models.build_reward_model(out / f"rm_seed{seed}", tokenizer, seed=seed, **sizes)


def write_config(out: Path, models: Path, batch: int, device: str) -> Path:
    config = out / "ensemble.yaml"
    config.write_text(
        "on_error: penalty\nerror_penalty: -1.0\nreward:\n  type: ensemble\n  name: uwo\n  objective: uwo\n"
        f"  uwo_weight: 0.1\n  path_template: {models}/rm_seed{{seed}}\n  seeds: [1, 2, 3, 4, 5]\n"
        f"  member:\n    max_length: 256\n    batch_size: {batch}\n    device: {device}\n"
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


def expected_rewards(config: Path, payloads: list[dict]) -> np.ndarray:
    from openrlhf_ext.server_protocol import GuardedScorer
    from reward_plugins import build_pipeline, load_pipeline_config

    scorer = GuardedScorer(build_pipeline(load_pipeline_config(config)), -1.0)
    outcomes = scorer.score_raw([p["query"][0] for p in payloads], [p["prompts"][0] for p in payloads], None)
    return np.array([o.reward for o in outcomes])


# ---------------------------------------------------------------- servers as subprocesses


def serve_baseline(config: str, port: int) -> None:
    """Like OpenRLHF's serve_rm: the model call blocks inside the async route, one sample per forward."""
    import uvicorn

    from openrlhf_ext.server_protocol import GuardedScorer, to_payload
    from reward_plugins import build_pipeline, load_pipeline_config

    scorer = GuardedScorer(build_pipeline(load_pipeline_config(config)), -1.0)
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        data = await request.json()
        outcomes = [scorer.score_raw([q], [p], [lab])[0] for q, p, lab in zip(data["query"], data["prompts"], data["labels"])]
        return to_payload(outcomes, scorer.log_keys)

    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


@dataclass
class Server:
    kind: str
    config: Path
    port: int
    max_batch_size: int
    max_wait_ms: float
    torch_threads: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        if self.kind == "batched":
            cmd = [sys.executable, "-m", "openrlhf_ext.serve", "--config", str(self.config), "--host", HOST,
                   "--port", str(self.port), "--max-batch-size", str(self.max_batch_size),
                   "--max-wait-ms", str(self.max_wait_ms), "--log-level", "warning"]
        else:
            cmd = [sys.executable, __file__, "--serve-baseline", str(self.config), "--port", str(self.port)]
        env = dict(os.environ)
        if self.torch_threads:
            env["OMP_NUM_THREADS"] = str(self.torch_threads)
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def wait_ready(self, timeout: float = 180.0) -> float:
        import httpx

        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.kind} server not ready after {timeout} s")

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=5.0).json()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


# ---------------------------------------------------------------- clients


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    answered: int = 0
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    mismatched: int = 0
    retried_ok: int = 0
    gave_up: int = 0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")


async def run_clients(url: str, payloads: list[dict], expected: np.ndarray | None, clients: int, duration: float,
                      retries: int = 1, on_tick=None) -> Tally:
    """`clients` loops posting one-sample requests until `duration` elapses; retries like OpenRLHF if asked."""
    tally = Tally()
    deadline = time.monotonic() + duration
    counter = iter(range(10**9))
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=clients)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one_client() -> None:
            while time.monotonic() < deadline:
                index = next(counter) % len(payloads)
                tally.sent += 1
                start = time.monotonic()
                for attempt in range(retries):
                    try:
                        async with session.post(url + "/get_reward", json=payloads[index]) as response:
                            tally.statuses[response.status] += 1
                            if response.status != 200:
                                raise aiohttp.ClientResponseError(response.request_info, (), status=response.status)
                            body = await response.json()
                        tally.answered += 1
                        tally.retried_ok += attempt > 0
                        tally.latencies.append(time.monotonic() - start)
                        if expected is not None and abs(body["rewards"] - expected[index]) > 1e-3:
                            tally.mismatched += 1
                        break
                    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                        tally.errors[type(exc).__name__] += 1
                        if attempt + 1 < retries:
                            await asyncio.sleep(1.0)
                else:
                    tally.gave_up += 1

        tasks = [asyncio.create_task(one_client()) for _ in range(clients)]
        if on_tick is not None:
            tasks.append(asyncio.create_task(on_tick()))
        await asyncio.gather(*tasks)
    return tally


# ---------------------------------------------------------------- modes


def throughput(args, config: Path, payloads: list[dict]) -> None:
    rows = {}
    for kind, port in (("batched", args.port), ("serial", args.port + 1)):
        server = Server(kind, config, port, args.max_batch_size, args.max_wait_ms, args.torch_threads)
        server.start()
        try:
            server.wait_ready()
            asyncio.run(run_clients(server.url, payloads, None, args.clients, min(2.0, args.duration)))
            tally = asyncio.run(run_clients(server.url, payloads, None, args.clients, args.duration))
        finally:
            server.stop()
        rows[kind] = (tally.answered / args.duration, tally.percentile(50), tally.percentile(99), tally)
    print(f"\nthroughput: {args.clients} concurrent clients, {args.duration:.0f} s each, 5-member ensemble "
          f"(member batch {args.member_batch_size}, hidden {args.hidden}, {args.layers} layers, device {args.device}, "
          f"torch threads {args.torch_threads or 'default'}, {os.cpu_count()} CPUs)")
    print(f"{'server':<34}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-200':>10}")
    labels = {"batched": f"ours (batch<={args.max_batch_size}, wait {args.max_wait_ms:g} ms)",
              "serial": "serve_rm-style (one at a time)"}
    for kind, (rps, p50, p99, tally) in rows.items():
        bad = sum(v for k, v in tally.statuses.items() if k != 200) + sum(tally.errors.values())
        print(f"{labels[kind]:<34}{rps:>10.1f}{p50:>10.1f}{p99:>10.1f}{bad:>10}")
    ratio = rows["batched"][0] / max(rows["serial"][0], 1e-9)
    print(f"throughput ratio ours / one-at-a-time: {ratio:.1f}x (target >= 5x)")


def load(args, config: Path, payloads: list[dict]) -> None:
    expected = expected_rewards(config, payloads)
    server = Server("batched", config, args.port, args.max_batch_size, args.max_wait_ms, args.torch_threads)
    server.start()
    try:
        server.wait_ready()
        before = server.health()["stats"]
        tally = asyncio.run(run_clients(server.url, payloads, expected, args.load_clients, args.load_duration))
        after = server.health()["stats"]
    finally:
        server.stop()
    delivered = after["delivered"] - before["delivered"]
    lost = tally.sent - tally.answered
    print(f"\nload: {args.load_clients} clients for {args.load_duration:.0f} s")
    print(f"sent {tally.sent}, answered 200 {tally.answered}, lost {lost}, server delivered {delivered} "
          f"(duplicates {max(0, delivered - tally.sent)}), wrong reward for its text {tally.mismatched}")
    print(f"req/s {tally.answered / args.load_duration:.1f}, p50 {tally.percentile(50):.1f} ms, "
          f"p99 {tally.percentile(99):.1f} ms, statuses {dict(tally.statuses)}, errors {dict(tally.errors)}, "
          f"largest batch {after['largest_batch']}")


def fault(args, config: Path, payloads: list[dict]) -> None:
    server = Server("batched", config, args.port, args.max_batch_size, args.max_wait_ms, args.torch_threads)
    server.start()
    server.wait_ready()
    events: dict[str, float] = {}

    async def kill_and_restart() -> None:
        await asyncio.sleep(args.fault_duration / 3)
        events["killed"] = time.monotonic()
        server.kill()
        await asyncio.sleep(args.restart_delay)
        server.start()
        events["restart_ready_s"] = await asyncio.to_thread(server.wait_ready) + args.restart_delay

    try:
        tally = asyncio.run(run_clients(server.url, payloads, expected_rewards(config, payloads), args.fault_clients,
                                        args.fault_duration, retries=5, on_tick=kill_and_restart))
    finally:
        server.stop()
    print(f"\nfault: {args.fault_clients} clients with OpenRLHF's retry policy (5 tries, 1 s apart), server killed "
          f"(SIGKILL) at {args.fault_duration / 3:.0f} s, restarted after {args.restart_delay:g} s, "
          f"serving again {events.get('restart_ready_s', float('nan')):.1f} s after the kill")
    print(f"requests {tally.sent}: answered {tally.answered} (after a retry {tally.retried_ok}), "
          f"failed all 5 tries {tally.gave_up} (OpenRLHF would record reward None), "
          f"wrong reward {tally.mismatched}")
    print(f"failed attempts by error: {dict(tally.errors)}; HTTP statuses: {dict(tally.statuses)}; "
          f"p99 latency {tally.percentile(99):.0f} ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["throughput", "load", "fault", "all"], default="all")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--load-clients", type=int, default=256)
    parser.add_argument("--load-duration", type=float, default=60.0)
    parser.add_argument("--fault-clients", type=int, default=32)
    parser.add_argument("--fault-duration", type=float, default=30.0)
    parser.add_argument("--restart-delay", type=float, default=2.0)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--member-batch-size", type=int, default=16,
                        help="each RM's forward batch inside a server batch (16 as in configs/rewards/ensemble_uwo5.yaml)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden size of each random RM")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--torch-threads", type=int, default=0, help="OMP_NUM_THREADS of both servers (0: torch's default)")
    parser.add_argument("--distinct", type=int, default=512, help="distinct request texts")
    parser.add_argument("--port", type=int, default=5917)
    parser.add_argument("--work-dir", default=None, help="where to build the models (default: a temp dir)")
    parser.add_argument("--serve-baseline", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline:
        serve_baseline(args.serve_baseline, args.port)
        return
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        out = Path(tmp)
        build_models(out / "models", args.hidden, args.layers)
        config = write_config(out, out / "models", args.member_batch_size, args.device)
        payloads = make_requests(args.distinct)
        if args.mode in ("throughput", "all"):
            throughput(args, config, payloads)
        if args.mode in ("load", "all"):
            load(args, config, payloads)
        if args.mode in ("fault", "all"):
            fault(args, config, payloads)


if __name__ == "__main__":
    main()
