"""The FastAPI app behind `python -m openrlhf_ext.serve`: OpenRLHF's `POST /get_reward`, `GET /health`.

Status codes: 200 for every request that was read; a sample that could not be scored has no reward and a coded
error in `errors` (see `server_protocol`: the client retries or applies `on_error`; no fallback crosses the wire);
400 invalid UTF-8, invalid or over-deep JSON; 401 bad or missing bearer token; 408 body not received in time;
413 body or sample count over the limit; 415 not `Content-Type: application/json`; 422 wrong shape (the first
few errors); 429 with `Retry-After` as soon as the admitted work would not be scored within `request_timeout_s`
(or no room came in time); 503 with `Retry-After` while `health` says the server cannot score (no live replica).
Every answer comes within `request_timeout_s` of the request's arrival, which `/health` announces, so a client
never re-sends work that is still being scored. Large bodies are parsed on a thread of their own, off the event
loop. `/docs` and `/openapi.json` are off.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import math
import re
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from uvicorn.protocols.http.h11_impl import H11Protocol

from reward_plugins.types import Sample

from .batcher import DynamicBatcher
from .server_protocol import GuardedScorer, Outcome, to_payload

logger = logging.getLogger(__name__)

INLINE_PARSE_BYTES = 32 * 1024  # larger bodies are parsed and searched on the parsing thread
UNAVAILABLE_RETRY_S = 5
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
Prepared = tuple[list[Outcome | None], list[Sample], list[int]]


@dataclass(frozen=True)
class ServerSettings:
    """Limits and batching knobs of one server (the token is left out of its repr, so it never reaches a log)."""

    max_batch_size: int = 64
    max_wait_ms: float = 10.0
    max_queue: int = 4096
    max_request_samples: int = 256
    max_body_bytes: int = 8 * 1024 * 1024
    request_timeout_s: float = 120.0
    token: str | None = field(default=None, repr=False)
    max_sample_chars: int = 256_000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_json_depth: int = 64
    max_listed_errors: int = 5


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


def _error(status: int, message: str, request_id: str | None = None, **headers: str) -> JSONResponse:
    if request_id is not None:
        headers["X-Request-Id"] = request_id
        log = logger.info if status in (429, 503) else logger.warning
        log("request %s: HTTP %d: %s", request_id, status, message)
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class Admission:
    """First-come-first-served room for at most `capacity` samples between arrival and answer.

    A request waits for room (bounded by its deadline) instead of being refused; a request larger than the
    whole capacity is admitted alone once everything before it has finished.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    async def acquire(self, n: int, timeout: float) -> bool:
        """Take room for `n` samples; False when none came within `timeout` seconds."""
        if not self._waiters and self._fits(n):
            self.in_use += n
            return True
        future = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
            return True
        except asyncio.TimeoutError:
            if future.done():
                return True
            self._forget(entry)
            return False
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(n)
            else:
                self._forget(entry)
            raise

    def _forget(self, entry: tuple[int, asyncio.Future]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(entry)
        entry[1].cancel()
        self._wake()

    def release(self, n: int) -> None:
        self.in_use -= n
        self._wake()

    def _fits(self, n: int) -> bool:
        return self.in_use + n <= self.capacity or self.in_use == 0

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            n, future = self._waiters.popleft()
            self.in_use += n
            future.set_result(None)


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """True when `value` nests lists/objects deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))
    return False


def parse_body(body: bytes, max_depth: int) -> Any:
    """Decode strict UTF-8 JSON no deeper than `max_depth`; ValueError with the reason otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"body nests deeper than {max_depth} levels") from None
    if json_depth_exceeds(value, max_depth):
        raise ValueError(f"body nests deeper than {max_depth} levels")
    return value


def validation_summary(exc: ValidationError, limit: int) -> str:
    """The first `limit` validation errors, each cut short, plus how many more there were."""
    errors = exc.errors(include_input=False, include_url=False)
    shown = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"[:200] for e in errors[:limit]]
    more = f"; and {len(errors) - limit} more" if len(errors) > limit else ""
    return "; ".join(shown) + more


class StatusCounter:
    """ASGI middleware counting answers by HTTP status (shown in /health, read by the benchmark)."""

    def __init__(self, app, counts: Counter):
        self.app = app
        self.counts = counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[str(message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


def _is_json(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


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
    """The bearer token from the Authorization header only: a token in a URL ends up in logs."""
    if token is None:
        return True
    header = request.headers.get("authorization", "")
    offered = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
    return hmac.compare_digest(offered.encode(), token.encode())


def request_id(request: Request) -> str:
    """The client's `X-Request-Id` when it is a short plain token, else a new one (it only ever reaches log lines)."""
    offered = request.headers.get("x-request-id", "")
    return offered if _REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex[:16]


def parse_request(body: bytes, settings: ServerSettings, scorer: GuardedScorer) -> tuple[int, Prepared]:
    """Decode, validate and split one request body into samples (in a thread for large bodies)."""
    parsed = RewardRequest.model_validate(parse_body(body, settings.max_json_depth))
    n = len(parsed.query)
    if n > settings.max_request_samples:
        return n, ([], [], [])
    return n, scorer.prepare(parsed.query, parsed.prompts, parsed.labels, settings.max_sample_chars)


def create_app(
    scorer: GuardedScorer, settings: ServerSettings = ServerSettings(), health: Callable[[], str | None] | None = None
) -> FastAPI:
    """Build the app; the batcher and the parsing thread start and stop with the app's lifespan.

    `health`: returns why the server cannot score now (every replica of a placed model gone), else None; while it
    says so, `/health` and `POST /get_reward` answer 503 so that clients go to another server.
    """
    batcher: DynamicBatcher = DynamicBatcher(
        scorer.score,
        settings.max_batch_size,
        settings.max_wait_ms / 1000.0,
        max(settings.max_queue, settings.max_request_samples),
    )
    admission = Admission(settings.max_queue)
    parsing: list[ThreadPoolExecutor] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        parsing.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-parse"))
        try:
            yield
        finally:
            await batcher.stop()
            parsing.pop().shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="reward-plugins server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.scorer = scorer
    app.state.admission = admission
    app.state.statuses = Counter()
    app.add_middleware(StatusCounter, counts=app.state.statuses)

    def unavailable() -> str | None:
        if health is None:
            return None
        try:
            return health()
        except Exception as exc:  # noqa: BLE001 - a failing check is itself a reason to send clients elsewhere
            return f"health check failed: {type(exc).__name__}: {exc}"

    def retry_after_s(samples: int) -> str:
        """Seconds until `samples` more would likely be scored within the request timeout again (1 to the timeout)."""
        excess = batcher.estimate_s(admission.in_use + samples) - settings.request_timeout_s
        return str(max(1, min(math.ceil(excess), math.ceil(settings.request_timeout_s))))

    @app.get("/health")
    async def health_route(request: Request) -> JSONResponse:
        problem = unavailable()
        body: dict[str, Any] = {"status": "unavailable" if problem else "ok"}
        if _authorised(request, settings.token):
            body.update(
                reason=problem,
                request_timeout_s=settings.request_timeout_s,
                policy=scorer.policy.wire(),
                log_keys=list(scorer.log_keys),
                max_request_samples=settings.max_request_samples,
                admitted=admission.in_use,
                queued=batcher.queued,
                stats=asdict(batcher.stats),
                statuses=dict(app.state.statuses),
            )
        return JSONResponse(body, status_code=503 if problem else 200)

    @app.post("/get_reward")
    async def get_reward(request: Request):
        arrived = time.monotonic()
        deadline = arrived + settings.request_timeout_s
        rid = request_id(request)
        if not _authorised(request, settings.token):
            return _error(401, "missing or wrong bearer token", rid, **{"WWW-Authenticate": "Bearer"})
        if not _is_json(request):
            return _error(415, "Content-Type must be application/json", rid)
        problem = unavailable()
        if problem:
            return _error(503, f"cannot score now: {problem}", rid, **{"Retry-After": str(UNAVAILABLE_RETRY_S)})
        body_wait = min(settings.body_timeout_s, settings.request_timeout_s)
        try:
            body = await asyncio.wait_for(_read_body(request, settings.max_body_bytes), body_wait)
        except asyncio.TimeoutError:
            return _error(408, f"request body not received within {body_wait:g} s", rid)
        if body is None:
            return _error(413, f"request body over {settings.max_body_bytes} bytes", rid)
        read = functools.partial(parse_request, body, settings, scorer)
        try:
            if len(body) > INLINE_PARSE_BYTES:
                n, prepared = await asyncio.get_running_loop().run_in_executor(parsing[0], read)
            else:
                n, prepared = read()
        except ValidationError as exc:
            return _error(422, validation_summary(exc, settings.max_listed_errors), rid)
        except ValueError as exc:
            return _error(400, str(exc), rid)
        if n > settings.max_request_samples:
            return _error(413, f"{n} samples in one request; the limit is {settings.max_request_samples}", rid)
        outcomes, samples, positions = prepared
        k = len(samples)
        if k:
            remaining = deadline - time.monotonic()
            if batcher.estimate_s(admission.in_use + k) > remaining or not await admission.acquire(
                k, remaining - batcher.estimate_s(k)
            ):
                return _error(429, f"too busy to score {k} samples within {settings.request_timeout_s:g} s; retry",
                              rid, **{"Retry-After": retry_after_s(k)})
            try:
                scored = await _score(samples, batcher, scorer, deadline, rid)
            finally:
                admission.release(k)
            for i, outcome in zip(positions, scored):
                outcomes[i] = outcome
        for i, outcome in enumerate(outcomes):
            if outcome is not None and outcome.error is not None:
                logger.warning("request %s: sample %d failed (%s): %s", rid, i, outcome.error.code, outcome.error.message)
        return JSONResponse(to_payload(outcomes, scorer.log_keys), headers={"X-Request-Id": rid})

    return app


async def _score(
    samples: list[Sample], batcher: DynamicBatcher, scorer: GuardedScorer, deadline: float, rid: str
) -> list[Outcome]:
    """Outcomes in order by `deadline`: what is not scored by then gets the retryable `timeout` code, never a reward."""
    timeout_s = max(0.0, deadline - time.monotonic())
    try:
        return await asyncio.wait_for(batcher.submit(samples), timeout_s)
    except asyncio.TimeoutError:
        logger.warning("request %s: %d samples not scored in time; answered as retryable timeouts", rid, len(samples))
        return [scorer.failure("timeout", f"not scored within the request timeout ({timeout_s:.1f} s left)")] * len(samples)
    except Exception as exc:  # noqa: BLE001 - the client still gets a well-formed answer, and retries
        logger.warning("request %s: batcher failed: %s: %s", rid, type(exc).__name__, exc)
        return [scorer.failure("internal", f"{type(exc).__name__}: {exc}")] * len(samples)


def guarded_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol that closes a connection whose request headers do not arrive in time."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _expire(self) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def uvicorn_config(app: FastAPI, settings: ServerSettings, **kwargs: Any) -> uvicorn.Config:
    """uvicorn settings that bound slow clients: header timeout, short keep-alive, h11 event-size cap."""
    return uvicorn.Config(
        app,
        http=guarded_protocol(settings.header_timeout_s),
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=64 * 1024,
        access_log=False,
        **kwargs,
    )


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, settings: ServerSettings = ServerSettings()
) -> Iterator[str]:
    """Run `app` under uvicorn in a daemon thread (for tests and notebooks); yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning", lifespan="on", timeout_graceful_shutdown=1))
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
