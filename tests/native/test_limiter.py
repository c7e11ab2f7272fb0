from __future__ import annotations

import pytest

from novacron.native import Counters, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_paces_to_rate_and_follows_rate_changes() -> None:
    clock = Clock()
    tb = TokenBucket(1_000_000, burst=100_000, clock=clock)
    assert tb.delay_for(100_000) == 0  # the burst goes at once
    assert tb.delay_for(500_000) == pytest.approx(0.5)
    clock.now += 0.5
    assert tb.delay_for(0) == 0
    tb.set_rate(2_000_000)
    assert tb.delay_for(200_000) == pytest.approx(0.1)
    tb.set_rate(0)
    assert tb.delay_for(10**12) == 0


def test_bucket_rejects_bad_values() -> None:
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            TokenBucket(bad)
    with pytest.raises(ValueError):
        TokenBucket(10, burst=0)
    with pytest.raises(ValueError):
        TokenBucket(10).delay_for(-5)


async def test_acquire_waits_for_debt() -> None:
    import time

    tb = TokenBucket(1_000_000, burst=65536)
    t0 = time.monotonic()
    await tb.acquire(65536)
    await tb.acquire(50_000)  # 50 ms of debt
    assert time.monotonic() - t0 >= 0.04


def test_counters_merge() -> None:
    a, b = Counters(pages_sent=2, seconds_scan=0.5), Counters(pages_sent=3, bytes_wire=7)
    a.merge(b)
    assert a.as_dict()["pages_sent"] == 5 and a.bytes_wire == 7 and a.seconds_scan == 0.5


def test_would_wait_reserves_nothing() -> None:
    now = [0.0]
    tb = TokenBucket(1_000_000, burst=100_000, clock=lambda: now[0])
    assert not tb.would_wait(100_000) and tb.would_wait(100_001)
    assert tb.delay_for(100_000) == 0.0  # nothing was taken by asking
    assert tb.would_wait(1)
    assert not TokenBucket(0).would_wait(1 << 30)  # unlimited
