"""CLI: serve a reward-pipeline YAML over OpenRLHF's HTTP protocol, batching concurrent requests.

    python -m openrlhf_ext.serve --config configs/rewards/ensemble_uwo5.yaml --host 127.0.0.1 --port 5000

Point OpenRLHF at it with `--reward.remote_url http://127.0.0.1:5000/get_reward` (a comma list of several
servers is round-robined by OpenRLHF). The models load before the port opens, so a /health answer means ready.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from reward_plugins.config import ConfigError, load_pipeline_config
from reward_plugins.pipeline import build_pipeline

from .server_app import ServerSettings, create_app, uvicorn_config
from .server_protocol import GuardedScorer, resolve_fallback

TOKEN_ENV = "REWARD_SERVER_TOKEN"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ServerSettings()
    parser = argparse.ArgumentParser(prog="python -m openrlhf_ext.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="reward pipeline YAML (configs/rewards/*.yaml)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless you mean otherwise)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="samples per model batch")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms, help="longest wait to fill a batch")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="samples admitted at once; later requests wait their turn (up to --request-timeout)")
    parser.add_argument("--max-request-samples", type=int, default=defaults.max_request_samples)
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                        help="seconds a request may wait for queue room (then 429 + Retry-After) and be scored "
                        "(then the fallback, reward/errors = 1)")
    parser.add_argument("--max-sample-chars", type=int, default=defaults.max_sample_chars,
                        help="a sample whose query + prompt is longer is an error sample (fallback reward)")
    parser.add_argument("--header-timeout", type=float, default=defaults.header_timeout_s,
                        help="close a connection whose request headers take longer (idle or half-open clients)")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                        help="answer 408 when the request body takes longer to arrive")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads of the scoring thread (default on CPU: half the cores, at most 4; "
                        "on a busy machine 1 is often fastest)")
    parser.add_argument("--fallback-reward", type=float, default=None,
                        help="reward of a sample that cannot be scored (default: the config's error_penalty, else 0)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}); "
                        "openrlhf_ext.hooks' client sends it from the same variable")
    parser.add_argument("--ray-address", default=None,
                        help="build plugins that have a placement as actors in this Ray cluster ('auto': the local one)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def torch_threads(requested: int | None) -> int | None:
    """Threads for torch: the request, else on a CPU-only machine half the cores (at most 4); None leaves torch's."""
    import torch

    if requested is None:
        if torch.cuda.is_available():
            return None
        requested = max(1, min(4, (os.cpu_count() or 2) // 2))
    if requested < 1:
        raise SystemExit(f"error: --torch-threads must be >= 1, got {requested}")
    torch.set_num_threads(requested)
    return requested


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = torch_threads(args.torch_threads)
    try:
        config = load_pipeline_config(args.config)
        fallback = resolve_fallback(config, args.fallback_reward)
    except (ConfigError, ValueError) as exc:
        print(f"openrlhf_ext.serve: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    placer = None
    if args.ray_address:
        from .placement import RayPlacer, connect

        connect(args.ray_address)
        placer = RayPlacer()
    scorer = GuardedScorer(build_pipeline(config, placer), fallback)
    settings = ServerSettings(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_request_samples=args.max_request_samples,
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout,
        token=args.token or None,
        max_sample_chars=args.max_sample_chars,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
    )
    logging.getLogger(__name__).info(
        "serving %s on http://%s:%d/get_reward (log keys: %s; torch threads %s)",
        args.config, args.host, args.port, ", ".join(scorer.log_keys), threads or "torch default",
    )
    app = create_app(scorer, settings)
    uvicorn.Server(uvicorn_config(app, settings, host=args.host, port=args.port, log_level=args.log_level)).run()


if __name__ == "__main__":
    main()
