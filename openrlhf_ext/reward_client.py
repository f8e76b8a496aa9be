"""HTTP reward client that replaces OpenRLHF 0.11.2's `SingleTurnAgentExecutor._fetch_rewards_via_http`.

OpenRLHF's own client tries 5 times, 1 s apart, then its executor swallows the error and the sample's reward
becomes `None`, which crashes the training step later. This client instead:
  - retries with exponential backoff and jitter, moving to the next listed server on every retry;
  - honours `Retry-After` (429/503) and stops at once on an answer that no retry can fix (400, 401, 413, ...);
  - sends `Authorization: Bearer $REWARD_SERVER_TOKEN`, so no token sits in a URL or a log line;
  - checks every answer (JSON object, finite numeric `rewards` of the right length) before handing it over;
  - within `$REWARD_CLIENT_TIMEOUT_S` seconds (default 600) returns rewards, else raises `RewardClientError`
    naming the server and the last error. That error derives from BaseException on purpose: the executor
    catches `Exception` into a `None` reward, so only a BaseException stops the rollout (and the run).
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

logger = logging.getLogger(__name__)

TOKEN_ENV = "REWARD_SERVER_TOKEN"
BUDGET_ENV = "REWARD_CLIENT_TIMEOUT_S"
DEFAULT_BUDGET_S = 600.0
ATTEMPT_TIMEOUT_S = 180.0
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class RewardClientError(BaseException):
    """No reward within the budget, or an answer no retry can fix; stops the rollout instead of a None reward."""


class _Retryable(Exception):
    """One failed attempt worth retrying; `retry_after` is the server's hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Permanent(Exception):
    """An answer that the same request will get again (bad request, bad token, too large)."""


@dataclass(frozen=True)
class ClientSettings:
    """Token, total budget and backoff shape of one client."""

    token: str | None = None
    budget_s: float = DEFAULT_BUDGET_S
    base_delay_s: float = 0.25
    max_delay_s: float = 10.0
    attempt_timeout_s: float = ATTEMPT_TIMEOUT_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSettings:
        """Read $REWARD_SERVER_TOKEN and $REWARD_CLIENT_TIMEOUT_S; a bad value is an error naming the variable."""
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
        return cls(token=environ.get(TOKEN_ENV) or None, budget_s=budget)

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Equal-jitter exponential backoff: half the capped delay plus a random half."""
        delay = min(self.max_delay_s, self.base_delay_s * 2.0**attempt)
        return delay / 2 + rng.uniform(0, delay / 2)


def redact(url: str) -> str:
    """The URL without query string or user info, for log lines."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


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


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_answer(body: Any, n: int) -> dict[str, Any]:
    """The answer object if it carries `n` finite rewards (scalar when n == 1, as OpenRLHF expects); else ValueError."""
    if not isinstance(body, dict) or "rewards" not in body:
        raise ValueError(f"answer is not an object with 'rewards' (got {type(body).__name__})")
    for key in ("rewards", "scores"):
        value = body.get(key)
        if value is None and key == "scores":
            continue
        values = value if isinstance(value, list) else [value]
        if len(values) != n or not all(_finite_number(v) for v in values):
            raise ValueError(f"answer's {key!r} is not {n} finite number(s): {str(value)[:80]}")
    logs = body.get("extra_logs", {})
    if not isinstance(logs, dict):
        raise ValueError("answer's 'extra_logs' is not an object")
    return body


async def _attempt(session: aiohttp.ClientSession, url: str, payload: dict, settings: ClientSettings, timeout: float):
    headers = {"Content-Type": "application/json"}
    if settings.token:
        headers["Authorization"] = f"Bearer {settings.token}"
    try:
        async with session.post(url, json=payload, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            raw = await response.read()
            status = response.status
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise _Retryable(f"{type(exc).__name__}: {exc or 'no detail'}") from None
    detail = raw[:200].decode("utf-8", "replace")
    if status in RETRYABLE_STATUS:
        raise _Retryable(f"HTTP {status}: {detail}", retry_after)
    if status != 200:
        raise _Permanent(f"HTTP {status}: {detail}")
    try:
        return check_answer(json.loads(raw), len(payload["query"]))
    except (ValueError, RecursionError) as exc:
        raise _Retryable(f"bad answer: {exc}") from None


async def post_with_retries(
    urls: Sequence[str], first: int, payload: dict, settings: ClientSettings, rng: random.Random | None = None,
    session: aiohttp.ClientSession | None = None,
) -> dict[str, Any]:
    """POST `payload` until a server returns a valid answer, starting at `urls[first]`; raises RewardClientError.
    `session`: the caller's connection pool (one per rollout batch), else a session of its own."""
    if session is None:
        async with aiohttp.ClientSession() as own:
            return await post_with_retries(urls, first, payload, settings, rng, own)
    rng = rng or random.Random()
    deadline = time.monotonic() + settings.budget_s
    attempt, last_url, last_error = 0, urls[first % len(urls)], "no attempt made"
    while True:
        url = urls[(first + attempt) % len(urls)]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            return await _attempt(session, url, payload, settings, min(settings.attempt_timeout_s, remaining))
        except _Permanent as exc:
            raise RewardClientError(
                f"reward server {redact(url)} refused the request ({exc}); retrying cannot help, stopping"
            ) from None
        except _Retryable as exc:
            last_url, last_error = url, str(exc)
            delay = settings.backoff(attempt, rng)
            if exc.retry_after is not None:
                delay = max(delay, exc.retry_after + rng.uniform(0, settings.base_delay_s))
            logger.warning(
                "reward server %s, attempt %d: %s; retrying in %.1f s", redact(url), attempt + 1, last_error, delay
            )
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(delay, remaining))
    raise RewardClientError(
        f"no reward after {settings.budget_s:g} s (${BUDGET_ENV}) and {attempt} attempts; "
        f"last server {redact(last_url)}: {last_error}"
    )


async def fetch_rewards_via_http(executor: Any, queries_list, prompts_list, labels_list) -> list[dict[str, Any]]:
    """Drop-in for `SingleTurnAgentExecutor._fetch_rewards_via_http`: one checked answer per server shard."""
    urls = list(executor.reward_endpoints)
    settings = ClientSettings.from_env()
    n_servers = len(urls)
    size = (len(queries_list) + n_servers - 1) // n_servers
    counter = getattr(executor, "_reward_client_calls", 0)
    executor._reward_client_calls = counter + 1
    tasks = []
    for shard, start in enumerate(range(0, len(queries_list), max(1, size))):
        payload = {
            "query": list(queries_list[start : start + size]),
            "prompts": list(prompts_list[start : start + size]),
            "labels": list(labels_list[start : start + size]),
        }
        tasks.append((urls, counter + shard, payload, settings))
    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(post_with_retries(*task, session=session) for task in tasks)))
