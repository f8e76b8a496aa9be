"""`python -m openrlhf_ext.launch [--reward-config X.yaml] <train_ppo_ray arguments>`.

Checks that openrlhf is exactly 0.11.2, runs OpenRLHF's own argument parser and validation (so a rejected
flag fails here, before Ray starts), refuses reward setups that cannot work, starts Ray with our
`worker_process_setup_hook` and the reward settings as env vars, then runs `openrlhf.cli.train_ppo_ray`
unchanged with `runpy`. `--dry-run` also works on a CPU install without vllm / flash_attn (their GPU modules
are imported through stand-ins for the check only) and may come after `--` (as the scripts' `EXTRA_ARGS=--dry-run`
put it); it never reaches OpenRLHF.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from reward_plugins.cli import run_cli

from .settings import HookSettings
from .version import check_openrlhf_version

CLI_MODULE = "openrlhf.cli.train_ppo_ray"
HOOK = "openrlhf_ext.hooks.install"
DEFERRED_REWARD = str(Path(__file__).with_name("deferred_reward.py"))
# train() sets these only when it starts Ray itself; we start Ray first, so we pass them on.
SHIM_CONFIG_ENV = "REWARD_PLUGINS_CONFIG"
OPENRLHF_ENV_DEFAULTS = {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}


class LaunchError(RuntimeError):
    """The arguments cannot give a working run; the message says why."""


class _Parsed(Exception):
    def __init__(self, parsed: SimpleNamespace):
        super().__init__("parsed")
        self.parsed = parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openrlhf_ext.launch",
        description="Run OpenRLHF 0.11.2's train_ppo_ray with the reward-plugins experience maker installed. "
        "Every argument not listed here goes to train_ppo_ray unchanged.",
        allow_abbrev=False,
    )
    parser.add_argument("--reward-config", help="reward pipeline YAML scored on the whole rollout batch in the trainer")
    parser.add_argument(
        "--shim-config",
        help="reward pipeline YAML for the reward_func shim (--reward.remote_url openrlhf_ext/reward_func.py), "
        "passed to the rollout workers as REWARD_PLUGINS_CONFIG",
    )
    parser.add_argument("--eval-dir", help="where eval files go (default: <--ckpt.output_dir>/eval)")
    parser.add_argument("--monitor-config", help="over-optimisation monitor settings (a YAML file with the fields of a "
                        "train YAML's monitor: section); files go to <--ckpt.output_dir>/monitor")
    parser.add_argument("--eval-every", type=int, help="record an eval file every N steps (default: --eval.steps)")
    parser.add_argument("--eval-top-p", type=float, help="top-p for held-out eval sampling (default: --rollout.top_p)")
    parser.add_argument("--eval-top-k", type=int, help="top-k for held-out eval sampling (default: --rollout.top_k)")
    parser.add_argument("--eval-before-training", action="store_true",
                        help="run the held-out evaluation once before the first step, as the VR-CLI authors' fork did")
    parser.add_argument("--dry-run", action="store_true", help="check and parse everything, print the plan, start nothing")
    parser.add_argument("--server-wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for HTTP reward servers to answer /health (one just started)")
    return parser


def split_argv(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and the rest for train_ppo_ray (a leading `--` separator is dropped)."""
    ours, rest = build_parser().parse_known_args(list(argv))
    if rest and rest[0] == "--":
        rest = rest[1:]
    late, rest = build_parser().parse_known_args(rest)
    defaults = vars(build_parser().parse_args([]))
    for key, value in vars(late).items():
        if value != defaults[key]:
            setattr(ours, key, value)
    return ours, rest


def use_cpu_stand_ins() -> bool:
    """For a dry run on a CPU install: stand-ins for vllm / flash_attn so OpenRLHF's modules import; True if used."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("flash_attn") is not None:
        return False
    from .cpu_stand_ins import install

    install()
    return True


@contextlib.contextmanager
def _stop_before_training() -> Iterator[None]:
    """Let train_ppo_ray parse and validate, then stop where `train(args)` would build the strategy."""
    import ray

    import openrlhf.utils as utils

    def capture(args: Any) -> None:
        raise _Parsed(args)

    saved = utils.get_strategy, ray.is_initialized
    utils.get_strategy, ray.is_initialized = capture, lambda: True
    try:
        yield
    finally:
        utils.get_strategy, ray.is_initialized = saved


def parse_openrlhf_args(argv: Sequence[str]) -> SimpleNamespace:
    """The nested args train_ppo_ray would train with, from its real parser and validation rules."""
    saved_argv = sys.argv
    sys.argv = [CLI_MODULE, *argv]
    try:
        with _stop_before_training():
            runpy.run_module(CLI_MODULE, run_name="__main__", alter_sys=False)
    except _Parsed as parsed:
        return parsed.parsed
    except SystemExit as exc:
        raise LaunchError(f"train_ppo_ray rejected the arguments (exit status {exc.code}; its message is above)") from None
    except AssertionError as exc:
        raise LaunchError(f"train_ppo_ray rejected the arguments: {exc}") from None
    finally:
        sys.argv = saved_argv
    raise LaunchError("train_ppo_ray returned without reaching train(args)")


def preflight(args: SimpleNamespace, reward_config: str | None) -> list[str]:
    """Refuse setups that would fail late or silently; return notes worth printing."""
    from reward_plugins.config import load_pipeline_config

    from .ref_scorer import check_reference_setup, external_scorer_specs

    notes = []
    if reward_config is None:
        if any(Path(url).name == Path(DEFERRED_REWARD).name for url in args.reward.remote_url or []):
            raise LaunchError(f"{DEFERRED_REWARD} only holds a place for --reward-config, which is missing")
        notes.append("no --reward-config: rewards come from the rollout side (--reward.remote_url); eval files only")
        return notes
    config = load_pipeline_config(reward_config, check_paths=False)
    refuse_unplaced_models(reward_config, config.reward)
    if config.on_error == "skip":
        raise LaunchError(
            f"{reward_config}: on_error: skip cannot be used in the experience maker (every sample needs a reward); "
            "use penalty or raise"
        )
    remote = args.reward.remote_url
    if not remote:
        raise LaunchError(
            "--reward-config scores in the trainer, but without --reward.remote_url train_ppo_ray builds a reward-model "
            f"actor group that waits for whole GPUs; pass --reward.remote_url {DEFERRED_REWARD}"
        )
    if args.algo.dynamic_filtering_enable:
        raise LaunchError(
            "--algo.dynamic_filtering_enable filters on rollout-side scores, before the experience maker scores; "
            "use the reward server for dynamic filtering instead of --reward-config"
        )
    check_reference_setup(
        list(external_scorer_specs(config.reward)),
        kl_init_coef=args.algo.kl.init_coef,
        rollout_temperature=args.rollout.temperature,
    )
    if args.eval.dataset:
        notes.append("--eval.dataset is scored in the trainer by --reward-config (logged as eval/<metric>)")
    return notes


def check_shim_policy(shim_config: str) -> None:
    """Refuse, before Ray starts, a shim config whose on_error OpenRLHF cannot honour (the shim would stop at once)."""
    from reward_plugins.config import load_pipeline_config

    from .server_protocol import ErrorPolicy

    try:
        ErrorPolicy.of(load_pipeline_config(shim_config, check_paths=False))
    except ValueError as exc:
        raise LaunchError(str(exc)) from None


def preflight_monitor(args: SimpleNamespace, reward_config: str | None, monitor_config: str) -> list[str]:
    """Refuse a monitor that cannot see what it needs: the KL (a reference model), member scores, models on a GPU."""
    from reward_plugins.config import load_pipeline_config
    from reward_plugins.monitor_session import load_monitor_config

    config = load_monitor_config(monitor_config)
    if not args.algo.kl.init_coef > 0:
        raise LaunchError(f"{monitor_config}: the monitor needs the KL to the reference model, which train_ppo_ray loads "
                          "only with --algo.kl.init_coef > 0")
    if config.shadow is None and reward_config is None and not config.members:
        raise LaunchError(f"{monitor_config}: rewards come from the rollout side, so name the member components the "
                          "monitor reads (members: [seed1, seed2, ...]) or a shadow ensemble (shadow: FILE)")
    for path in (config.shadow, config.gold.reward_config if config.gold else None):
        if path is not None:
            refuse_unplaced_models(path, load_pipeline_config(path, check_paths=False).reward)
    notes = [f"monitor: {monitor_config} (files in {Path(args.ckpt.output_dir, 'monitor')})"]
    if config.action == "adapt_kl" and not args.algo.kl.use_loss:
        notes.append("monitor adapt_kl: the raised KL coefficient enters the rewards from the batch after the alarm")
    return notes


def refuse_unplaced_models(reward_config: str, spec: Any) -> None:
    """Refuse a reward that would load models in the trainer actor, which holds no GPU (they would run on its CPU)."""
    from reward_plugins.placement import unplaced_models

    unplaced = unplaced_models(spec)
    if unplaced:
        raise LaunchError(
            f"{reward_config}: --reward-config scores in OpenRLHF's trainer actor, which holds no GPU, so these models "
            f"would load and run on its CPU: {'; '.join(unplaced)}. Fix: give each a placement so it runs in Ray "
            "actors holding GPUs (placement: {num_gpus: 1} on a reward_model or vrcli scorer, "
            "member: {placement: {num_gpus: 1}} on an ensemble; see configs/rewards/ensemble_uwo5_placed.yaml), "
            "or serve the file on GPUs with "
            "python -m openrlhf_ext.serve --config FILE and pass --reward.remote_url http://HOST:PORT/get_reward "
            "instead of --reward-config"
        )


def check_reward_servers(remote_urls: Sequence[str] | None, timeout: float = 5.0, wait: float = 0.0) -> None:
    """Fail now, not at the first rollout, when an HTTP reward server does not answer `GET /health` (within `wait` s)."""
    import time

    deadline = time.monotonic() + wait
    while True:
        try:
            return _check_reward_servers(remote_urls, timeout)
        except LaunchError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def _check_reward_servers(remote_urls: Sequence[str] | None, timeout: float) -> None:
    for url in remote_urls or []:
        if not url.startswith(("http://", "https://")):
            continue
        parts = urllib.parse.urlsplit(url)
        health = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/health", "", ""))
        try:
            with urllib.request.urlopen(health, timeout=timeout) as response:
                response.read()
        except (OSError, urllib.error.URLError) as exc:
            raise LaunchError(
                f"reward server {url} does not answer {health} ({exc}); start it first, e.g. "
                "python -m openrlhf_ext.serve --config configs/rewards/<file>.yaml --host 127.0.0.1 --port 5000"
            ) from None


def runtime_env(
    settings: HookSettings, environ: dict[str, str] | None = None, shim_config: str | None = None
) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    env_vars = {key: environ.get(key, default) for key, default in OPENRLHF_ENV_DEFAULTS.items()}
    env_vars.update(settings.env_vars())
    if shim_config:
        env_vars[SHIM_CONFIG_ENV] = shim_config
    return {"worker_process_setup_hook": HOOK, "env_vars": env_vars}


def main(argv: Sequence[str] | None = None) -> int:
    ours, rest = split_argv(sys.argv[1:] if argv is None else argv)
    check_openrlhf_version()
    if ours.dry_run and use_cpu_stand_ins():
        print("[openrlhf_ext.launch] note: vllm / flash_attn are not installed (CPU install); OpenRLHF's modules are "
              "imported through stand-ins for this dry run only", file=sys.stderr)
    reward_config = str(Path(ours.reward_config).resolve()) if ours.reward_config else None
    args = parse_openrlhf_args(rest)
    notes = preflight(args, reward_config)
    monitor_config = str(Path(ours.monitor_config).resolve()) if ours.monitor_config else None
    if monitor_config:
        notes += preflight_monitor(args, reward_config, monitor_config)
    eval_dir = str(Path(ours.eval_dir).resolve()) if ours.eval_dir else None
    settings = HookSettings(
        reward_config, eval_dir or str(Path(args.ckpt.output_dir, "eval").resolve()), ours.eval_every,
        ours.eval_top_p, ours.eval_top_k, ours.eval_before_training, monitor_config=monitor_config,
    )
    shim_config = str(Path(ours.shim_config).resolve()) if ours.shim_config else None
    if shim_config:
        check_shim_policy(shim_config)
    env = runtime_env(settings, shim_config=shim_config)
    for note in notes:
        print(f"[openrlhf_ext.launch] note: {note}", file=sys.stderr)
    if ours.dry_run:
        try:
            check_reward_servers(args.reward.remote_url, wait=ours.server_wait)
        except LaunchError as exc:
            print(f"[openrlhf_ext.launch] note: {exc}", file=sys.stderr)
        else:
            for url in args.reward.remote_url or []:
                if url.startswith(("http://", "https://")):
                    print(f"[openrlhf_ext.launch] reward server {url} answers /health")
        print(f"[openrlhf_ext.launch] ok: runtime_env={env}")
        return 0
    check_reward_servers(args.reward.remote_url, wait=ours.server_wait)
    import ray

    if ray.is_initialized():
        print("[openrlhf_ext.launch] Ray is already initialised; the setup hook must be in its runtime_env", file=sys.stderr)
    else:
        ray.init(runtime_env=env)
    sys.argv = [CLI_MODULE, *rest]
    runpy.run_module(CLI_MODULE, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "openrlhf_ext.launch", user_errors=(LaunchError,)))
