"""Defender client pieces that need no server: the quota limiter and Retry-After parsing."""

from __future__ import annotations

import email.utils
import logging

import pytest

from tests.util import m2d


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_limiter_never_lets_a_window_hold_more_than_its_calls(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limiter = m2d.RateLimiter("import", [(3, 60.0)], clock=clock, sleep=clock.sleep)
    sent = []
    with caplog.at_level(logging.INFO, logger="misp2defender"):
        for _ in range(7):
            limiter.acquire()
            sent.append(clock.now)
            clock.now += 1.0
    window = 60.0 * 1.02 + 0.05  # the limiter's safety margin
    assert all(sum(1 for t in sent if start <= t < start + window) <= 3 for start in sent)
    assert len(clock.slept) == 2  # the 4th and the 7th call waited
    waits = [r.getMessage() for r in caplog.records if "quota: waiting" in r.getMessage()]
    assert len(waits) == 2 and waits[0].startswith("Defender import quota: waiting ")


def test_quota_requests_applies_on_top_of_the_documented_limits_and_the_stricter_wins() -> None:
    limiters = m2d.build_limiters(quota_requests=10)
    assert min(n for n, _ in limiters["import"].limits) == 10  # stricter than 30/min
    lax = m2d.build_limiters(quota_requests=1000)
    assert min(n for n, _ in lax["import"].limits) == 30
    assert sorted(n for n, _ in lax["list"].limits) == [100, 1000, 1500]


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    assert m2d.parse_retry_after("7") == 7.0
    assert m2d.parse_retry_after("1.5") == 1.5
    assert m2d.parse_retry_after(None) is None and m2d.parse_retry_after("soon") is None
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert m2d.parse_retry_after(date, now=1_000_000.0) == pytest.approx(30.0)
    past = email.utils.formatdate(999_000.0, usegmt=True)
    assert m2d.parse_retry_after(past, now=1_000_000.0) == 0.0


def test_a_retry_after_holds_back_the_next_call() -> None:
    clock = FakeClock()
    limiter = m2d.RateLimiter("import", [(30, 60.0)], clock=clock, sleep=clock.sleep)
    limiter.acquire()
    limiter.defer(5.0)
    limiter.acquire()
    assert clock.slept == [5.0]
