"""The FastAPI app behind `python -m openrlhf_ext.serve`: OpenRLHF's `POST /get_reward`, `GET /health`.

Status codes: 200 for every request that was read (samples that fail to score get the fallback reward and
`reward/errors` = 1); 400 unreadable JSON; 401 bad or missing bearer token; 413 body or sample count over
the limit; 422 wrong shape; 503 queue full (OpenRLHF's client retries 5 times, 1 s apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .batcher import DynamicBatcher, QueueFull
from .server_protocol import GuardedScorer, Outcome, to_payload

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    """Limits and batching knobs of one server."""

    max_batch_size: int = 64
    max_wait_ms: float = 10.0
    max_queue: int = 4096
    max_request_samples: int = 256
    max_body_bytes: int = 8 * 1024 * 1024
    request_timeout_s: float = 120.0
    token: str | None = None


class RewardRequest(BaseModel):
    """OpenRLHF's request body: `query` (singular) plus parallel `prompts` and `labels` lists."""

    model_config = ConfigDict(extra="ignore")

    query: list[str]
    prompts: list[str] | None = None
    labels: list[Any] | None = None

    @model_validator(mode="after")
    def _parallel(self) -> RewardRequest:
        if not self.query:
            raise ValueError("query is empty")
        for name in ("prompts", "labels"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.query):
                raise ValueError(f"{name} has {len(values)} entries but query has {len(self.query)}")
        return self


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it exceeds `limit` bytes (checked on the header and while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _authorised(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    header = request.headers.get("authorization", "")
    offered = header[len("Bearer ") :] if header.startswith("Bearer ") else request.query_params.get("token", "")
    return hmac.compare_digest(offered.encode(), token.encode())


def create_app(scorer: GuardedScorer, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """Build the app; the batcher starts and stops with the app's lifespan."""
    batcher: DynamicBatcher = DynamicBatcher(
        scorer.score, settings.max_batch_size, settings.max_wait_ms / 1000.0, settings.max_queue
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="reward-plugins server", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.scorer = scorer

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "queued": batcher.queued,
            "log_keys": list(scorer.log_keys),
            "fallback": scorer.fallback,
            "stats": asdict(batcher.stats),
        }

    @app.post("/get_reward")
    async def get_reward(request: Request):
        if not _authorised(request, settings.token):
            return _error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        body = await _read_body(request, settings.max_body_bytes)
        if body is None:
            return _error(413, f"request body over {settings.max_body_bytes} bytes")
        try:
            parsed = RewardRequest.model_validate(json.loads(body))
        except json.JSONDecodeError as exc:
            return _error(400, f"body is not valid JSON: {exc}")
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
            return _error(422, problems)
        n = len(parsed.query)
        if n > settings.max_request_samples:
            return _error(413, f"{n} samples in one request; the limit is {settings.max_request_samples}")
        outcomes = await _score(parsed, batcher, scorer, settings.request_timeout_s)
        if outcomes is None:
            return _error(503, f"reward queue full ({settings.max_queue} samples); retry later", **{"Retry-After": "1"})
        return JSONResponse(to_payload(outcomes, scorer.log_keys))

    return app


async def _score(
    parsed: RewardRequest, batcher: DynamicBatcher, scorer: GuardedScorer, timeout_s: float
) -> list[Outcome] | None:
    """Outcomes in request order (None when the queue is full); a timeout gives fallbacks, never a hang."""
    outcomes, samples, positions = scorer.prepare(parsed.query, parsed.prompts, parsed.labels)
    if samples:
        try:
            scored = await asyncio.wait_for(batcher.submit(samples), timeout_s)
        except QueueFull:
            return None
        except asyncio.TimeoutError:
            logger.warning("scoring %d samples took over %.0f s; answering the fallback", len(samples), timeout_s)
            scored = [scorer.failure(f"timed out after {timeout_s} s")] * len(samples)
        except Exception as exc:  # noqa: BLE001 - the client still gets a well-formed answer
            logger.warning("batcher failed: %s: %s", type(exc).__name__, exc)
            scored = [scorer.failure(f"{type(exc).__name__}: {exc}")] * len(samples)
        for i, outcome in zip(positions, scored):
            outcomes[i] = outcome
    return outcomes  # type: ignore[return-value]


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` under uvicorn in a daemon thread (for tests and notebooks); yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the reward server thread exited during start-up")
            threading.Event().wait(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
