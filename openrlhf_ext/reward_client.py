"""HTTP reward client that replaces OpenRLHF 0.11.2's `SingleTurnAgentExecutor._fetch_rewards_via_http`.

OpenRLHF's own client tries 5 times, 1 s apart, then its executor swallows the error and the sample's reward
becomes `None`, which crashes the training step later. This client instead:
  - sends `Authorization: Bearer <token>` (from $REWARD_SERVER_TOKEN, or the file named by
    $REWARD_SERVER_TOKEN_FILE), so no token sits in a URL, and an `X-Request-Id` per attempt;
  - reads each server's `/health` once: its request timeout sets this client's per-attempt timeout (so work is
    never re-sent while the server may still be scoring it), its `on_error` policy and log keys are checked;
  - checks every answer sample by sample (finite float32 rewards, scores and logs, exactly the declared log keys,
    at most a size cap) and retries only the samples that need it, each on the next server: those the server
    marked retryable (timeout, no live replica, ...) and those it answered with unusable numbers;
  - remembers every server in a process-wide book: a 429's `Retry-After` (capped) makes that sample wait or go
    to another server; errors and backoff put the server aside for everyone while the others are used; a server
    that times out or refuses connections is put aside for a growing interval (a circuit breaker), then one
    sample probes its /health before the others use it again;
  - applies `on_error` once, at the end, to the samples the server could not score for a reason of their own
    (penalty: the announced `error_penalty`, `reward/errors` = 1; raise: stops the run);
  - within $REWARD_CLIENT_TIMEOUT_S seconds (default 600) returns a reward for every sample, else raises
    `RewardClientError`. That error derives from BaseException on purpose: the executor catches `Exception`
    into a `None` reward, so only a BaseException stops the rollout (and the run).
Log lines and errors name the server, the HTTP status, the answer's size and the request id, never a value read
from an answer's body or headers (a proxy that echoes requests would otherwise put the token in them).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import time
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .server_protocol import ErrorPolicy, Outcome, read_answer, read_token_file, to_payload

logger = logging.getLogger(__name__)

TOKEN_ENV = "REWARD_SERVER_TOKEN"
TOKEN_FILE_ENV = "REWARD_SERVER_TOKEN_FILE"
BUDGET_ENV = "REWARD_CLIENT_TIMEOUT_S"
DEFAULT_BUDGET_S = 600.0
ATTEMPT_TIMEOUT_S = 180.0
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
BREAKER_STATUS = frozenset({502, 504})  # a gateway saying the server behind it is gone


class RewardClientError(BaseException):
    """No reward within the budget, or an answer no retry can fix; stops the rollout instead of a None reward."""


@dataclass(frozen=True)
class ClientSettings:
    """Token, total budget, backoff and breaker shape, answer size cap of one client."""

    token: str | None = field(default=None, repr=False)
    budget_s: float = DEFAULT_BUDGET_S
    base_delay_s: float = 0.25
    max_delay_s: float = 10.0
    max_retry_after_s: float = 30.0
    breaker_base_s: float = 1.0
    breaker_max_s: float = 10.0
    attempt_timeout_s: float = ATTEMPT_TIMEOUT_S  # until a server's /health announces its own request timeout
    answer_bytes_per_sample: int = 256 * 1024

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSettings:
        """Read the token and $REWARD_CLIENT_TIMEOUT_S; a bad value is an error naming the variable, not the value."""
        environ = os.environ if environ is None else environ
        text = environ.get(BUDGET_ENV, "").strip()
        budget = DEFAULT_BUDGET_S
        if text:
            try:
                budget = float(text)
            except ValueError:
                budget = math.nan
            if not math.isfinite(budget) or budget <= 0:
                raise RewardClientError(f"${BUDGET_ENV} must be a positive number of seconds, got {text!r}")
        return cls(token=read_token(environ), budget_s=budget)

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Equal-jitter exponential backoff: half the capped delay plus a random half."""
        delay = min(self.max_delay_s, self.base_delay_s * 2.0 ** min(attempt, 32))
        return delay / 2 + rng.uniform(0, delay / 2)

    def breaker_s(self, failures: int) -> float:
        """How long a server that timed out or refused `failures` times in a row is put aside."""
        return min(self.breaker_max_s, self.breaker_base_s * 2.0 ** min(max(failures - 1, 0), 32))

    def max_answer_bytes(self, samples: int) -> int:
        return 64 * 1024 + samples * self.answer_bytes_per_sample


def read_token(environ: Mapping[str, str]) -> str | None:
    """$REWARD_SERVER_TOKEN, else the content of the file $REWARD_SERVER_TOKEN_FILE names (stripped), else None."""
    if environ.get(TOKEN_ENV):
        return environ[TOKEN_ENV]
    if not environ.get(TOKEN_FILE_ENV):
        return None
    try:
        return read_token_file(environ[TOKEN_FILE_ENV], f"${TOKEN_FILE_ENV}")
    except ValueError as exc:
        raise RewardClientError(str(exc)) from None


def redact(url: str) -> str:
    """The URL without query string or user info, for log lines."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def health_url(url: str) -> str:
    """`/health` beside the reward path (http://h:p/get_reward -> http://h:p/health)."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rsplit("/", 1)[0] + "/health"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


class _Failure(Exception):
    """One attempt at one server failed as a whole; `breaker`: the server timed out or refused (put it aside);
    `busy`: it is only busy (429), so this sample waits or goes elsewhere while the others may still be admitted."""

    def __init__(self, what: str, retry_after: float | None = None, breaker: bool = False, busy: bool = False):
        super().__init__(what)
        self.retry_after = retry_after
        self.breaker = breaker
        self.busy = busy


class _Refused(Exception):
    """An answer that the same request will get again anywhere (bad request, bad token, too large)."""


@dataclass
class ServerInfo:
    """What a server's /health announced (None: it did not say)."""

    request_timeout_s: float | None = None
    policy: ErrorPolicy | None = None
    log_keys: tuple[str, ...] | None = None


@dataclass
class ServerState:
    """This process's view of one server."""

    url: str
    blocked_until: float = 0.0
    failures: int = 0  # consecutive breaker failures
    soft: int = 0  # consecutive other failures (backoff)
    failed_at: float = -math.inf  # when the last failure was counted
    last_error: str = ""
    probing: bool = False
    info: ServerInfo | None = None

    def attempt_timeout_s(self, settings: ClientSettings) -> float:
        """The server's announced request timeout plus slack for the network, else the default."""
        announced = self.info.request_timeout_s if self.info is not None else None
        return settings.attempt_timeout_s if announced is None else 1.1 * announced + 2.0


class ServerBook:
    """What this process knows about every server, shared by all samples and their retries."""

    def __init__(self) -> None:
        self.servers: dict[str, ServerState] = {}
        self.policy: tuple[str, ErrorPolicy] | None = None
        self.log_keys: tuple[str, ...] | None = None

    def state(self, url: str) -> ServerState:
        return self.servers.setdefault(url, ServerState(url))

    def choose(self, urls: Sequence[str], start: int, now: float, avoid: Mapping[str, float]) -> ServerState | None:
        """The first server, in rotation from `start`, not put aside, not being probed, and not one this sample
        was told to avoid (`avoid`: url -> until when)."""
        for offset in range(len(urls)):
            state = self.state(urls[(start + offset) % len(urls)])
            if state.blocked_until <= now and not state.probing and avoid.get(state.url, 0.0) <= now:
                return state
        return None

    def wake_at(self, urls: Sequence[str], now: float, avoid: Mapping[str, float]) -> float:
        """When the first of `urls` may be tried again (a probe in flight: look again shortly)."""
        return min(max(s.blocked_until if s.blocked_until > now else now + 0.2 * s.probing, avoid.get(s.url, 0.0))
                   for s in map(self.state, urls))

    def failed(self, state: ServerState, failure: _Failure, settings: ClientSettings, rng: random.Random,
               started: float = math.inf) -> float:
        """Put the server aside after a failed attempt begun at `started`; returns for how long.

        Attempts that were already under way when an earlier failure was counted share that failure (one outage
        seen by many samples at once counts once, so the breaker interval grows per probe, not per sample)."""
        now = time.monotonic()
        new = started >= state.failed_at
        state.last_error = str(failure)
        if new:
            state.failed_at = now
        if failure.breaker:
            state.failures += new
            state.info = None  # it may come back with other settings
            delay = settings.breaker_s(state.failures)
        elif failure.retry_after is not None:
            delay = min(failure.retry_after, settings.max_retry_after_s) + rng.uniform(0, settings.base_delay_s)
        else:
            delay = settings.backoff(state.soft, rng)
            state.soft += new
        state.blocked_until = max(state.blocked_until, now + delay)
        return delay

    def succeeded(self, state: ServerState) -> None:
        state.failures = 0
        state.soft = 0

    def learn(self, state: ServerState, info: ServerInfo) -> None:
        """Record what a server announced; servers that disagree on on_error or log keys stop the run."""
        state.info = info
        if info.policy is not None:
            if self.policy is None:
                self.policy = (state.url, info.policy)
            elif self.policy[1] != info.policy:
                raise RewardClientError(
                    f"reward servers disagree on on_error: {redact(self.policy[0])} announces {self.policy[1].wire()}, "
                    f"{redact(state.url)} {info.policy.wire()}; serve the same reward YAML everywhere"
                )
        if info.log_keys is not None:
            self.expect_keys(state.url, info.log_keys)

    def expect_keys(self, url: str, keys: tuple[str, ...]) -> None:
        if self.log_keys is None:
            self.log_keys = keys
        elif self.log_keys != keys:
            raise RewardClientError(
                f"reward server {redact(url)} declares other log keys ({len(keys)}) than the first server "
                f"({len(self.log_keys)}); OpenRLHF needs the same keys for every sample: serve the same reward YAML"
            )


_BOOK = ServerBook()
_RNG = random.Random()


def _headers(settings: ClientSettings, rid: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Request-Id": rid}
    if settings.token:
        headers["Authorization"] = f"Bearer {settings.token}"
    return headers


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """The body, or None once it is over `cap` bytes (checked on the declared length and while reading)."""
    if response.content_length is not None and response.content_length > cap:
        return None
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _exchange(
    session: aiohttp.ClientSession, method: str, url: str, settings: ClientSettings, timeout: float, rid: str,
    cap: int, payload: dict | None = None,
) -> tuple[int, bytes, float | None]:
    """(status, body, Retry-After seconds) of one HTTP exchange; _Failure on no answer or an oversized one."""
    try:
        async with session.request(method, url, json=payload, headers=_headers(settings, rid),
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            raw = await _read_capped(response, cap)
            status = response.status
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
    except asyncio.TimeoutError:
        raise _Failure(f"no answer within {timeout:.1f} s", breaker=True) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise _Failure(f"connection failed ({type(exc).__name__})", breaker=True) from None
    if raw is None:
        raise _Failure(f"HTTP {status}, answer over the {cap}-byte cap")
    return status, raw, retry_after


async def _health(state: ServerState, session: aiohttp.ClientSession, settings: ClientSettings, timeout: float,
                  book: ServerBook) -> None:
    """Learn the server's request timeout, policy and log keys from its /health (once, until it fails)."""
    rid = uuid.uuid4().hex[:16]
    status, raw, retry_after = await _exchange(session, "GET", health_url(state.url), settings, min(timeout, 10.0),
                                               rid, 1024 * 1024)
    if status == 503:
        raise _Failure(f"/health answers HTTP 503 ({len(raw)} bytes, request {rid})", retry_after or 5.0)
    info = ServerInfo()
    if status == 200:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
        if isinstance(body, dict):
            timeout_s = body.get("request_timeout_s")
            if isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and 0 < timeout_s < 1e6:
                info.request_timeout_s = float(timeout_s)
            if "policy" in body:
                try:
                    info.policy = ErrorPolicy.from_wire(body["policy"])
                except ValueError as exc:
                    raise RewardClientError(f"reward server {redact(state.url)}: {exc}") from None
            keys = body.get("log_keys")
            if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
                info.log_keys = tuple(keys)
    book.learn(state, info)


async def _attempt(state: ServerState, session: aiohttp.ClientSession, payload: dict, settings: ClientSettings,
                   timeout: float, book: ServerBook) -> list[Outcome]:
    """POST `payload` to one server: its per-sample outcomes, or _Failure / _Refused for the attempt as a whole."""
    rid = uuid.uuid4().hex[:16]
    n = len(payload["query"])
    status, raw, retry_after = await _exchange(session, "POST", state.url, settings, timeout, rid,
                                               settings.max_answer_bytes(n), payload)
    what = f"HTTP {status}, {len(raw)} bytes, request {rid}"
    if status in RETRYABLE_STATUS:
        raise _Failure(what, retry_after, breaker=status in BREAKER_STATUS, busy=status == 429)
    if status != 200:
        raise _Refused(what)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise _Failure(f"{what}: the answer is not JSON") from None
    try:
        outcomes = read_answer(body, n, book.log_keys)
    except ValueError as exc:
        raise _Failure(f"{what}: {exc}") from None
    scored = [outcome for outcome in outcomes if outcome.error is None]
    if book.log_keys is None and scored:
        book.expect_keys(state.url, tuple(scored[0].logs))
    return outcomes


async def score_with_retries(
    urls: Sequence[str], first: int, payload: dict, settings: ClientSettings,
    session: aiohttp.ClientSession, book: ServerBook | None = None, rng: random.Random | None = None,
) -> list[Outcome]:
    """One final outcome per sample of `payload`, starting at `urls[first]`; raises RewardClientError.

    Each round sends the samples still without an answer to the next server that is not put aside; the samples
    a server could not score for a reason of their own are settled by the announced `on_error` at the end.
    """
    book = _BOOK if book is None else book
    rng = _RNG if rng is None else rng
    n = len(payload["query"])
    done: list[Outcome | None] = [None] * n
    unscorable: dict[int, tuple[Outcome, ServerState]] = {}
    pending = list(range(n))
    deadline = time.monotonic() + settings.budget_s
    attempts, last = 0, "no attempt made"
    avoid: dict[str, float] = {}  # servers that told this sample to wait (429), until when
    while pending:
        now = time.monotonic()
        if now >= deadline:
            break
        state = book.choose(urls, first + attempts, now, avoid)
        if state is None:
            wake = book.wake_at(urls, now, avoid)
            await asyncio.sleep(min(max(wake - now, 0.0) + rng.uniform(0, 0.05), deadline - now))
            continue
        attempts += 1
        state.probing = state.failures > 0
        started = time.monotonic()
        try:
            if state.info is None:  # first contact, or the probe of a server put aside: its /health
                await _health(state, session, settings, deadline - time.monotonic(), book)
                if state.probing:
                    book.succeeded(state)
                    state.probing = False
            timeout = min(state.attempt_timeout_s(settings), deadline - time.monotonic())
            part = {key: [payload[key][i] for i in pending] for key in ("query", "prompts", "labels")}
            outcomes = await _attempt(state, session, part, settings, timeout, book)
        except _Refused as exc:
            raise RewardClientError(
                f"reward server {redact(state.url)} refused the request ({exc}; the server's log has the reason); "
                "retrying cannot help, stopping"
            ) from None
        except _Failure as exc:
            last = f"{redact(state.url)}: {exc}"
            if exc.busy:
                wait = exc.retry_after if exc.retry_after is not None else settings.backoff(attempts, rng)
                avoid[state.url] = time.monotonic() + min(wait, settings.max_retry_after_s) + rng.uniform(0, 0.25)
                logger.info("reward server %s is busy (%s); %d sample(s) try the next server or wait",
                            redact(state.url), exc, len(pending))
                continue
            delay = book.failed(state, exc, settings, rng, started)
            logger.warning("reward server %s: %s; %d sample(s) go to the next server, this one rests %.1f s",
                           redact(state.url), exc, len(pending), delay)
            continue
        finally:
            state.probing = False
        book.succeeded(state)
        retry, codes = [], set()
        for i, outcome in zip(pending, outcomes):
            if outcome.error is None:
                done[i] = outcome
            elif outcome.error.retry:
                retry.append(i)
                client_side = outcome.error.code == "bad_answer"  # our own words about the answer, never its values
                codes.add(f"bad_answer: {outcome.error.message}" if client_side else outcome.error.code)
            else:
                unscorable[i] = (outcome, state)
        if retry:
            codes = sorted(codes)
            if codes == ["timeout"]:  # the server was busy: these samples wait or go elsewhere, the others need not
                avoid[state.url] = time.monotonic() + settings.backoff(attempts, rng)
            else:
                book.failed(state, _Failure("samples to retry"), settings, rng, started)
            last = f"{redact(state.url)}: {len(retry)} sample(s) not scored ({', '.join(codes)})"
            logger.warning("reward server %s could not score %d sample(s) now (%s); retried on the next server",
                           redact(state.url), len(retry), ", ".join(codes))
        pending = retry
    if pending:
        if last == "no attempt made":  # every server was put aside by other samples' failures the whole time
            last = "every server was put aside; " + "; ".join(
                f"{redact(url)}: {book.state(url).last_error or 'busy'}" for url in urls)
        raise RewardClientError(
            f"no reward for {len(pending)} of {n} sample(s) after {settings.budget_s:g} s (${BUDGET_ENV}) and "
            f"{attempts} attempts; last: {last}"
        )
    for i, (outcome, state) in unscorable.items():
        policy = state.info.policy if state.info is not None else None
        where = f"reward server {redact(state.url)} could not score a sample ({outcome.error.code}; its log has why)"
        if policy is None:
            raise RewardClientError(f"{where} and did not announce its on_error policy in /health; stopping")
        if policy.on_error == "raise":
            raise RewardClientError(f"{where} and the reward YAML says on_error: raise; stopping")
        done[i] = policy.penalised(outcome)
    return done  # type: ignore[return-value]


async def fetch_rewards_via_http(executor: Any, queries_list, prompts_list, labels_list) -> list[dict[str, Any]]:
    """Drop-in for `SingleTurnAgentExecutor._fetch_rewards_via_http`: one checked answer for the call's samples."""
    urls = list(executor.reward_endpoints)
    settings = ClientSettings.from_env()
    counter = getattr(executor, "_reward_client_calls", 0)
    executor._reward_client_calls = counter + 1
    payload = {"query": list(queries_list), "prompts": list(prompts_list), "labels": list(labels_list)}
    async with aiohttp.ClientSession() as session:
        outcomes = await score_with_retries(urls, counter, payload, settings, session)
    return [to_payload(outcomes, list(outcomes[0].logs), errors=False)] if outcomes else []
