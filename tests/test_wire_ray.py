"""Issue 17 on a real local Ray cluster, started the way the README's recipe says (setup hook + a token *file* in the
runtime_env): the token never reaches a log, `ps` or an error; a shim that stops the run tells the driver why in one
line; a stopped (SIGSTOP) or lost replica costs no sample its own reward."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import serve_helpers
from serve_helpers import PROMPTS, RESPONSES, chars_scorer, execute, install_client, make_engine

ray = pytest.importorskip("ray")
pytest.importorskip("openrlhf")

from openrlhf_ext.server_app import ServerSettings, create_app, serve_in_thread  # noqa: E402
from openrlhf_ext.server_protocol import GuardedScorer  # noqa: E402
from openrlhf_ext.placement import RayPlacer  # noqa: E402
from reward_plugins import Sample, build_pipeline, parse_pipeline_config  # noqa: E402

SECRET = "ray-secret-5b1e9c"
SHIM_FILE = str(Path(__file__).resolve().parents[1] / "openrlhf_ext" / "reward_func.py")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Ray as the README's recipe starts it: the setup hook, and the token as a file path in env_vars."""
    token_file = tmp_path_factory.mktemp("secret") / "reward_token"
    token_file.write_text(SECRET)
    token_file.chmod(0o600)
    env_vars = {"REWARD_SERVER_TOKEN_FILE": str(token_file), "REWARD_CLIENT_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"worker_process_setup_hook": "openrlhf_ext.hooks.install", "env_vars": env_vars})
    ray.cloudpickle.register_pickle_by_value(serve_helpers)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    yield session, token_file
    ray.shutdown()


@ray.remote(num_cpus=0.25)
def rollout_in_a_worker(urls, tokenizer_dir, n):
    """What a vLLM rollout actor does: OpenRLHF's executor, with whatever the setup hook installed."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    pairs = [(PROMPTS[i % 4] + f" Case {i}.", RESPONSES[i % 4]) for i in range(n)]
    tokenizer, engine, prompts = make_engine(tokenizer_dir, pairs)
    outputs = execute(urls, tokenizer, engine, prompts)
    client = SingleTurnAgentExecutor._fetch_rewards_via_http.__module__
    return client, [o["reward"] for o in outputs], [-float(len(r)) for _, r in pairs]


def test_token_travels_as_a_file_path_and_never_reaches_a_log(cluster, tokenizer_dir, capfd, caplog):
    session, token_file = cluster
    with serve_in_thread(create_app(chars_scorer(), ServerSettings(token=SECRET))) as url:
        client, rewards, expected = ray.get(rollout_in_a_worker.remote([url], str(tokenizer_dir), 6))
        health = httpx.get(url + "/health").text + httpx.get(url + "/health", headers={"Authorization": f"Bearer {SECRET}"}).text
        with serve_in_thread(create_app(chars_scorer(), ServerSettings(token="another-token"))) as other:
            with pytest.raises(ray.exceptions.RayTaskError) as refused:
                ray.get(rollout_in_a_worker.remote([other], str(tokenizer_dir), 1))
    assert client == "openrlhf_ext.reward_client", "the README's runtime_env installs our client in the workers"
    assert rewards == expected, "the token from the file reached the server"
    assert "refused the request (HTTP 401" in str(refused.value)
    time.sleep(1.0)  # let Ray flush its log files
    logs = [p for p in session.rglob("*") if p.is_file()]
    assert any(str(token_file) in p.read_text(errors="replace") for p in logs), "the logs record the runtime_env (path)"
    leaked = [str(p) for p in logs if SECRET in p.read_text(errors="replace")]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    captured = capfd.readouterr()
    for where, text in {"Ray logs": "\n".join(leaked), "ps": ps, "/health": health, "the exception": str(refused.value),
                        "driver output": captured.out + captured.err, "log records": caplog.text}.items():
        assert SECRET not in text, f"the token leaked into {where}"


@ray.remote(num_cpus=0.25)
def shim_rollout(tokenizer_dir, n):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    pairs = [(PROMPTS[i % 4], RESPONSES[i % 4]) for i in range(n)]
    tokenizer, engine, prompts = make_engine(tokenizer_dir, pairs)
    executor = SingleTurnAgentExecutor(remote_rm_url=[SHIM_FILE])

    async def run():
        params = serve_helpers.sampling_params()
        return await asyncio.gather(*(executor.execute(p, None, params, 256, tokenizer, engine) for p in prompts))

    return asyncio.run(run())


def test_a_shim_that_stops_the_run_tells_the_driver_why_in_one_line(cluster, tokenizer_dir, tmp_path):
    config = tmp_path / "tokens.yaml"  # counting tokens needs token ids, which the shim never has: every sample fails
    config.write_text("on_error: penalty\nerror_penalty: -1\nreward:\n  type: length_penalty\n  coef: 1.0\n  unit: tokens\n")
    env = {"env_vars": {"REWARD_PLUGINS_CONFIG": str(config), "REWARD_PLUGINS_MAX_CONSECUTIVE_FAILURES": "3"}}
    with pytest.raises(ray.exceptions.RayTaskError) as stopped:
        ray.get(shim_rollout.options(runtime_env=env).remote(str(tokenizer_dir), 8))
    last = str(stopped.value).strip().splitlines()[-1]
    assert last.startswith("openrlhf_ext.shim.RewardStopped: reward_func stopped the run: 3 samples in a row failed "
                           "to score ($REWARD_PLUGINS_MAX_CONSECUTIVE_FAILURES=3); 3 sample(s) failed to score; "
                           "last error: plugin_error: "), last


def test_stopped_replicas_cost_no_sample_its_reward(cluster, monkeypatch, tokenizer_dir, rm_dirs):
    """One replica stopped: its share moves to the other, it is killed and restarted. Both stopped: no live replica,
    the server answers 503 and the client takes every sample to another server."""
    install_client(monkeypatch)
    reward = {"type": "reward_model", "name": "rm", "path": str(rm_dirs[1]), "batch_size": 4}
    placement = {"num_gpus": 0, "num_cpus": 0.25, "replicas": 2, "max_restarts": 1, "call_timeout_s": 3}
    config = {"on_error": "penalty", "error_penalty": -1.0}
    local = build_pipeline(parse_pipeline_config({**config, "reward": reward}))
    placer = RayPlacer()
    placed = build_pipeline(parse_pipeline_config({**config, "reward": {**reward, "placement": placement}}), placer)
    pairs = [(PROMPTS[i % 4] + f" Variant {i}.", RESPONSES[i % 4]) for i in range(16)]
    tokenizer, engine, prompts = make_engine(tokenizer_dir, pairs)
    expected = np.array(local.score([Sample(p, r) for p, (_, r) in zip(prompts, pairs)]).rewards, dtype=float)
    group = placed.root.replicas
    stopped = [group.pids()[0]]
    app = create_app(GuardedScorer(placed), ServerSettings(max_wait_ms=50), health=placer.unavailable)
    try:
        os.kill(stopped[0], signal.SIGSTOP)
        with serve_in_thread(app) as url:
            outputs = execute([url], tokenizer, engine, prompts)
        got = np.array([o["reward"] for o in outputs], dtype=float)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        assert not np.isclose(got, -1.0).any(), "no valid sample got the penalty"
        deadline = time.monotonic() + 90
        while group.alive != [0, 1] and time.monotonic() < deadline:
            group.refresh(timeout=1.0)
        assert group.alive == [0, 1] and stopped[0] not in group.pids(), "the stopped replica was killed and restarted"

        stopped = group.pids()
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        with serve_in_thread(app) as dead, serve_in_thread(create_app(GuardedScorer(local))) as live:
            outputs = execute([dead, live], tokenizer, engine, prompts[:8])
            health = httpx.get(dead + "/health")
            refused = httpx.post(dead + "/get_reward", json={"query": ["pabc"], "prompts": ["p"]})
        np.testing.assert_allclose([o["reward"] for o in outputs], expected[:8], rtol=1e-4, atol=1e-4)
        assert health.status_code == 503 and "rm: no live replica" in health.json()["reason"]
        assert "1 gone for good" in health.json()["reason"], "replica 0 had used its one restart"
        assert refused.status_code == 503
    finally:
        for pid in stopped:
            if _exists(pid):
                os.kill(pid, signal.SIGCONT)
        placer.close()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
