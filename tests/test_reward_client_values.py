"""The reward client's bookkeeping without a server: settings from the environment, backoff and breaker intervals,
Retry-After, URLs for log lines, and how the server book chooses, puts aside and learns about servers. Time and
randomness are fixed here, so every interval is checked exactly against values written by hand."""

from __future__ import annotations

import math

import pytest

from openrlhf_ext import reward_client
from openrlhf_ext.reward_client import (
    ClientSettings, RewardClientError, ServerBook, ServerInfo, ServerState, _Failure, _headers, health_url,
    parse_retry_after, read_token, redact,
)
from openrlhf_ext.server_protocol import ErrorPolicy


class Edge:
    """A random source that always answers the low (or high) end of the range."""

    def __init__(self, high: bool):
        self.high = high

    def uniform(self, low: float, high: float) -> float:
        return high if self.high else low


def error_of(call) -> str:
    with pytest.raises(RewardClientError) as error:
        call()
    return str(error.value)


def test_budget_from_the_environment():
    assert ClientSettings.from_env({}) == ClientSettings()
    assert ClientSettings().budget_s == 600.0 and ClientSettings.from_env({"REWARD_CLIENT_TIMEOUT_S": "  "}).budget_s == 600.0
    assert ClientSettings.from_env({"REWARD_CLIENT_TIMEOUT_S": " 12.5 "}).budget_s == 12.5
    assert ClientSettings.from_env({"REWARD_CLIENT_TIMEOUT_S": "1e-3"}).budget_s == 0.001
    for text in ("0", "-2", "nan", "inf", "ten"):
        assert error_of(lambda text=text: ClientSettings.from_env({"REWARD_CLIENT_TIMEOUT_S": text})) == (
            f"$REWARD_CLIENT_TIMEOUT_S must be a positive number of seconds, got {text!r}")
    assert ClientSettings.from_env({"REWARD_SERVER_TOKEN": "t0k"}).token == "t0k"
    assert "t0k" not in repr(ClientSettings(token="t0k"))


def test_token_from_the_variable_then_the_file(tmp_path):
    file = tmp_path / "token"
    file.write_text(" from-file\n", encoding="utf-8")
    assert read_token({"REWARD_SERVER_TOKEN": "direct", "REWARD_SERVER_TOKEN_FILE": str(file)}) == "direct"
    assert read_token({"REWARD_SERVER_TOKEN": "", "REWARD_SERVER_TOKEN_FILE": str(file)}) == "from-file"
    assert read_token({}) is None and read_token({"REWARD_SERVER_TOKEN_FILE": ""}) is None
    missing = tmp_path / "missing"
    assert error_of(lambda: read_token({"REWARD_SERVER_TOKEN_FILE": str(missing)})) == (
        f"$REWARD_SERVER_TOKEN_FILE names {missing}, which cannot be read (No such file or directory)")
    assert _headers(ClientSettings(token="abc"), "r1") == {"Content-Type": "application/json", "X-Request-Id": "r1",
                                                         "Authorization": "Bearer abc"}
    assert _headers(ClientSettings(), "r2") == {"Content-Type": "application/json", "X-Request-Id": "r2"}


def test_backoff_is_half_the_capped_delay_plus_a_random_half():
    settings = ClientSettings(base_delay_s=0.25, max_delay_s=10.0)
    low, high = Edge(False), Edge(True)
    assert [settings.backoff(a, low) for a in (0, 1, 3, 5, 6, 40)] == [0.125, 0.25, 1.0, 4.0, 5.0, 5.0]
    assert [settings.backoff(a, high) for a in (0, 1, 3, 5, 6, 40)] == [0.25, 0.5, 2.0, 8.0, 10.0, 10.0]
    assert ClientSettings(base_delay_s=1e-12, max_delay_s=1e9).backoff(100, high) == pytest.approx(1e-12 * 2.0**32)


def test_breaker_interval_doubles_from_the_first_failure_and_is_capped():
    settings = ClientSettings(breaker_base_s=0.5, breaker_max_s=3.0)
    assert [settings.breaker_s(k) for k in (0, 1, 2, 3, 4, 100)] == [0.5, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert ClientSettings(breaker_base_s=1e-12, breaker_max_s=1e9).breaker_s(100) == pytest.approx(1e-12 * 2.0**32)
    assert ClientSettings().max_answer_bytes(3) == 64 * 1024 + 3 * 256 * 1024
    assert ClientSettings(answer_bytes_per_sample=10).max_answer_bytes(0) == 65536


def test_retry_after_values():
    assert parse_retry_after(" 3 ") == 3.0 and parse_retry_after("0.5") == 0.5 and parse_retry_after("-5") == 0.0
    assert parse_retry_after("nan") is None and parse_retry_after("inf") is None and parse_retry_after("") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412500.0) == 0.0  # a date in the past: now
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412489.5) == 0.5
    assert parse_retry_after("Wed, 99 Foo 2015") is None
    assert 0.0 < parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT") < math.inf  # against the clock


def test_urls_for_log_lines_and_health():
    assert redact("http://user:pw@host:8000/get_reward?token=x#frag") == "http://host:8000/get_reward"
    assert redact("https://host/r") == "https://host/r" and redact("/only/a/path") == "/only/a/path"
    assert health_url("http://h:1/get_reward") == "http://h:1/health"
    assert health_url("http://h:1/api/v1/get_reward?x=1#f") == "http://h:1/api/v1/health"


def test_attempt_timeout_follows_the_announced_one():
    settings = ClientSettings(attempt_timeout_s=7.0)
    state = ServerState("http://a/r")
    assert state.attempt_timeout_s(settings) == 7.0
    state.info = ServerInfo()
    assert state.attempt_timeout_s(settings) == 7.0
    state.info = ServerInfo(request_timeout_s=10.0)
    assert state.attempt_timeout_s(settings) == pytest.approx(13.0)


URLS = ["http://a/r", "http://b/r", "http://c/r"]


def test_choose_rotates_from_start_and_skips_what_is_aside():
    book = ServerBook()
    assert book.choose(URLS, 4, 100.0, {}).url == URLS[1]  # start 4 of 3: the second
    book.state(URLS[1]).blocked_until = 100.0  # until now: free again
    assert book.choose(URLS, 1, 100.0, {}).url == URLS[1]
    book.state(URLS[1]).blocked_until = 100.5
    assert book.choose(URLS, 1, 100.0, {}).url == URLS[2]
    assert book.choose(URLS, 1, 100.0, {URLS[2]: 100.0}).url == URLS[2]  # told to wait until now: may go
    assert book.choose(URLS, 1, 100.0, {URLS[2]: 101.0}).url == URLS[0]
    book.state(URLS[0]).probing = True
    assert book.choose(URLS, 1, 100.0, {URLS[2]: 101.0}) is None
    assert ServerBook().choose(URLS, 0, 0.5, {}).url == URLS[0]  # no entry to avoid: free at any clock reading


def test_wake_at_is_the_earliest_time_any_server_may_be_tried():
    book = ServerBook()
    for url, until in zip(URLS, (105.0, 103.0, 104.0)):
        book.state(url).blocked_until = until
    assert book.wake_at(URLS, 100.0, {}) == 103.0
    assert book.wake_at(URLS, 100.0, {URLS[1]: 104.5}) == 104.0  # b told this sample to wait past c's block
    book.state(URLS[2]).blocked_until = 99.0
    assert book.wake_at(URLS, 100.0, {}) == 100.0  # c is free now
    book.state(URLS[2]).probing = True
    assert book.wake_at(URLS, 100.0, {}) == pytest.approx(100.2)  # c is being probed: look again shortly
    book.state(URLS[2]).blocked_until = 100.0
    assert book.wake_at(URLS, 100.0, {}) == pytest.approx(100.2)  # its block ends now, but the probe is in flight
    assert ServerBook().wake_at(URLS, 0.25, {}) == 0.25  # nothing aside: now, at any clock reading


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(reward_client.time, "monotonic", lambda: now[0])
    return now


def test_failed_breaker_counts_one_outage_once_and_forgets_the_servers_settings(clock):
    settings = ClientSettings(breaker_base_s=1.0, breaker_max_s=60.0)
    book, state = ServerBook(), ServerState("http://a/r", info=ServerInfo(request_timeout_s=5.0))
    down = _Failure("connection failed", breaker=True)
    assert book.failed(state, down, settings, Edge(True), started=999.0) == 1.0
    assert (state.failures, state.failed_at, state.blocked_until, state.info) == (1, 1000.0, 1001.0, None)
    assert state.last_error == "connection failed"
    clock[0] = 1000.5
    assert book.failed(state, down, settings, Edge(True), started=999.5) == 1.0  # under way before: the same outage
    assert state.failures == 1 and state.failed_at == 1000.0 and state.blocked_until == 1001.5
    assert book.failed(state, down, settings, Edge(True), started=1000.0) == 2.0  # begun after it was counted: new
    assert state.failures == 2 and state.failed_at == 1000.5 and state.blocked_until == 1002.5
    book.succeeded(state)
    assert (state.failures, state.soft) == (0, 0)


def test_failed_with_retry_after_or_backoff(clock):
    settings = ClientSettings(base_delay_s=0.5, max_delay_s=8.0, max_retry_after_s=30.0)
    book, state = ServerBook(), ServerState("http://a/r")
    assert book.failed(state, _Failure("busy", retry_after=3.0), settings, Edge(True)) == 3.5
    assert book.failed(state, _Failure("busy", retry_after=3600.0), settings, Edge(False)) == 30.0
    assert state.blocked_until == 1030.0 and state.soft == 0 and state.failures == 0
    state.blocked_until = 0.0
    assert [book.failed(state, _Failure("x"), settings, Edge(False)) for _ in range(3)] == [0.25, 0.5, 1.0]
    assert state.soft == 3 and state.blocked_until == 1001.0
    assert book.failed(state, _Failure("x"), settings, Edge(False), started=0.0) == 2.0  # shared: soft stays
    assert state.soft == 3 and state.blocked_until == 1002.0
    state.blocked_until = 5000.0
    book.failed(state, _Failure("x"), settings, Edge(False))
    assert state.blocked_until == 5000.0  # never shortened


def test_learn_records_the_first_policy_and_keys_and_refuses_disagreement():
    book = ServerBook()
    a, b = book.state("http://u:p@a:1/r?t=1"), book.state("http://b:2/r")
    penalty = ErrorPolicy("penalty", -1.0)
    info = ServerInfo(request_timeout_s=3.0, policy=penalty, log_keys=("reward/mean", "reward/errors"))
    book.learn(a, info)
    assert a.info is info and book.policy == (a.url, penalty) and book.log_keys == ("reward/mean", "reward/errors")
    book.learn(b, ServerInfo(policy=ErrorPolicy("penalty", -1.0)))  # the same policy, no keys: fine
    assert book.policy == (a.url, penalty) and b.info.log_keys is None
    assert error_of(lambda: book.learn(b, ServerInfo(policy=ErrorPolicy("raise")))) == (
        "reward servers disagree on on_error: http://a:1/r announces {'on_error': 'penalty', 'error_penalty': -1.0}, "
        "http://b:2/r {'on_error': 'raise', 'error_penalty': None}; serve the same reward YAML everywhere")
    assert error_of(lambda: book.learn(b, ServerInfo(log_keys=("reward/mean",)))) == (
        "reward server http://b:2/r declares other log keys (1) than the first server (2); OpenRLHF needs the same "
        "keys for every sample: serve the same reward YAML")
    fresh = ServerBook()
    fresh.learn(b, ServerInfo())
    assert fresh.policy is None and fresh.log_keys is None
