"""CLI: serve a reward-pipeline YAML over OpenRLHF's HTTP protocol, batching concurrent requests.

    python -m openrlhf_ext.serve --config configs/rewards/ensemble_uwo5.yaml --host 127.0.0.1 --port 5000

Point OpenRLHF at it with `--reward.remote_url http://127.0.0.1:5000/get_reward` (a comma list of several
servers is round-robined by OpenRLHF). The models load before the port opens, so a /health answer means ready.
The bearer token comes from $REWARD_SERVER_TOKEN or `--token-file`, never from the command line (`ps` shows it).
The YAML's `on_error` is announced in /health and applied by the client (`server_protocol`); `skip` is refused.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

import uvicorn

from reward_plugins.config import ConfigError, load_pipeline_config
from reward_plugins.pipeline import build_pipeline

from .server_app import ServerSettings, create_app, uvicorn_config
from .server_protocol import ErrorPolicy, GuardedScorer, read_token_file

TOKEN_ENV = "REWARD_SERVER_TOKEN"
logger = logging.getLogger(__name__)


class _Refused(argparse.Action):
    """An option that is gone: using it is an error that says what to do instead (the value is never echoed)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"{parser.prog}: error: {option_string} is not accepted: {self.help}\n")


def read_token(path: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The token from `path` (--token-file), else $REWARD_SERVER_TOKEN, else None; ValueError for an unusable file,
    a warning when others may read it."""
    environ = os.environ if environ is None else environ
    if path is None:
        return environ.get(TOKEN_ENV) or None
    token = read_token_file(path, "--token-file")
    mode = os.stat(path).st_mode
    if mode & 0o077:
        logger.warning("--token-file %s can be read by other users (mode %o); chmod 600 it", path, mode & 0o777)
    return token


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
                        help="every request is answered within this many seconds of arriving (announced in /health): "
                        "429 + Retry-After at once when the admitted work would not be scored by then, samples not "
                        "scored in time are marked as retryable errors")
    parser.add_argument("--max-sample-chars", type=int, default=defaults.max_sample_chars,
                        help="a sample whose query + prompt is longer is an error sample (code too_large)")
    parser.add_argument("--header-timeout", type=float, default=defaults.header_timeout_s,
                        help="close a connection whose request headers take longer (idle or half-open clients)")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                        help="answer 408 when the request body takes longer to arrive")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads of the scoring thread (default on CPU: half the cores, at most 4; "
                        "on a busy machine 1 is often fastest)")
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help=f"require 'Authorization: Bearer TOKEN' with the token in this file (default: ${TOKEN_ENV} "
                        "if set); the client reads $REWARD_SERVER_TOKEN or $REWARD_SERVER_TOKEN_FILE")
    parser.add_argument("--token", nargs="?", action=_Refused,
                        help=f"a token on the command line shows in `ps`; set ${TOKEN_ENV} or pass --token-file PATH")
    parser.add_argument("--fallback-reward", nargs="?", action=_Refused,
                        help="the server no longer answers a fallback reward: the YAML's on_error / error_penalty is "
                        "announced in /health and applied once by the client")
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
        token = read_token(args.token_file)
        config = load_pipeline_config(args.config)
        ErrorPolicy.of(config)
    except (ConfigError, ValueError) as exc:
        print(f"openrlhf_ext.serve: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    placer = None
    if args.ray_address:
        from .placement import RayPlacer, connect

        connect(args.ray_address)
        placer = RayPlacer()
    scorer = GuardedScorer(build_pipeline(config, placer))
    settings = ServerSettings(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_request_samples=args.max_request_samples,
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout,
        token=token,
        max_sample_chars=args.max_sample_chars,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
    )
    logger.info(
        "serving %s on http://%s:%d/get_reward (log keys: %s; on_error %s, applied by the client; token %s; "
        "torch threads %s)",
        args.config, args.host, args.port, ", ".join(scorer.log_keys), scorer.policy.on_error,
        "required" if token else "not required", threads or "torch default",
    )
    app = create_app(scorer, settings, placer.unavailable if placer is not None else None)
    gc.freeze()  # what start-up loaded stays out of the collector's scans: a large body's objects then cost no full-heap pause
    uvicorn.Server(uvicorn_config(app, settings, host=args.host, port=args.port, log_level=args.log_level)).run()


if __name__ == "__main__":
    main()
