"""The FastAPI app behind `python -m openrlhf_ext.serve`: OpenRLHF's `POST /get_reward`, `GET /health`.

Status codes: 200 for every request that was read (samples that fail to score, are over the size cap or
give a non-finite result get the fallback reward and `reward/errors` = 1); 400 invalid UTF-8, invalid or
over-deep JSON; 401 bad or missing bearer token; 408 body not received within the body timeout; 413 body or
sample count over the limit; 415 not `Content-Type: application/json`; 422 wrong shape (the first few
errors); 429 with `Retry-After` when the queue stayed full for the whole `request_timeout_s`. Nothing a
client sends yields a 5xx. Under load a request waits for queue room (first come, first served) instead of
being refused. Header and body reads are bounded in time, so idle or trickling connections are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from uvicorn.protocols.http.h11_impl import H11Protocol

from .batcher import DynamicBatcher
from .server_protocol import GuardedScorer, Outcome, to_payload

logger = logging.getLogger(__name__)

INLINE_PREPARE_CHARS = 20_000


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


def _error(status: int, message: str, **headers: str) -> JSONResponse:
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
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
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


def create_app(scorer: GuardedScorer, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """Build the app; the batcher starts and stops with the app's lifespan."""
    batcher: DynamicBatcher = DynamicBatcher(
        scorer.score,
        settings.max_batch_size,
        settings.max_wait_ms / 1000.0,
        max(settings.max_queue, settings.max_request_samples),
    )
    admission = Admission(settings.max_queue)

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
    app.state.admission = admission
    app.state.statuses = Counter()
    app.add_middleware(StatusCounter, counts=app.state.statuses)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if not _authorised(request, settings.token):
            return {"status": "ok"}
        return {
            "status": "ok",
            "admitted": admission.in_use,
            "queued": batcher.queued,
            "log_keys": list(scorer.log_keys),
            "fallback": scorer.fallback,
            "stats": asdict(batcher.stats),
            "statuses": dict(app.state.statuses),
        }

    @app.post("/get_reward")
    async def get_reward(request: Request):
        if not _authorised(request, settings.token):
            return _error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        if not _is_json(request):
            return _error(415, "Content-Type must be application/json")
        arrived = time.monotonic()
        try:
            body = await asyncio.wait_for(_read_body(request, settings.max_body_bytes), settings.body_timeout_s)
        except asyncio.TimeoutError:
            return _error(408, f"request body not received within {settings.body_timeout_s:g} s")
        if body is None:
            return _error(413, f"request body over {settings.max_body_bytes} bytes")
        try:
            parsed = RewardRequest.model_validate(parse_body(body, settings.max_json_depth))
        except ValidationError as exc:
            return _error(422, validation_summary(exc, settings.max_listed_errors))
        except ValueError as exc:
            return _error(400, str(exc))
        n = len(parsed.query)
        if n > settings.max_request_samples:
            return _error(413, f"{n} samples in one request; the limit is {settings.max_request_samples}")
        wait = max(0.0, settings.request_timeout_s - (time.monotonic() - arrived))
        if not await admission.acquire(n, wait):
            return _error(429, f"reward queue stayed full for {settings.request_timeout_s:g} s; retry", **{"Retry-After": "1"})
        try:
            outcomes = await _score(parsed, batcher, scorer, settings)
            payload = to_payload(outcomes, scorer.log_keys)
        except Exception as exc:  # noqa: BLE001 - a bug of ours still answers every sample, counted as an error
            logger.exception("answering %d samples failed", n)
            payload = to_payload([scorer.failure(f"{type(exc).__name__}: {exc}")] * n, scorer.log_keys)
        finally:
            admission.release(n)
        return JSONResponse(payload)

    return app


async def _score(parsed: RewardRequest, batcher: DynamicBatcher, scorer: GuardedScorer, settings: ServerSettings) -> list[Outcome]:
    """Outcomes in request order; a timeout gives fallbacks, never a hang.

    The prompt search is linear; for requests over INLINE_PREPARE_CHARS it runs in a thread, off the event loop.
    """
    timeout_s = settings.request_timeout_s
    size = sum(map(len, parsed.query)) + sum(len(p or "") for p in parsed.prompts or ())
    prepare = functools.partial(scorer.prepare, parsed.query, parsed.prompts, parsed.labels, settings.max_sample_chars)
    if size > INLINE_PREPARE_CHARS:
        outcomes, samples, positions = await asyncio.to_thread(prepare)
    else:
        outcomes, samples, positions = prepare()
    if samples:
        try:
            scored = await asyncio.wait_for(batcher.submit(samples), timeout_s)
        except asyncio.TimeoutError:
            logger.warning("scoring %d samples took over %.1f s; answering the fallback", len(samples), timeout_s)
            scored = [scorer.failure(f"timed out after {timeout_s} s")] * len(samples)
        except Exception as exc:  # noqa: BLE001 - the client still gets a well-formed answer
            logger.warning("batcher failed: %s: %s", type(exc).__name__, exc)
            scored = [scorer.failure(f"{type(exc).__name__}: {exc}")] * len(samples)
        for i, outcome in zip(positions, scored):
            outcomes[i] = outcome
    return outcomes  # type: ignore[return-value]


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
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning", lifespan="on"))
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
