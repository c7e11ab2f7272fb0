"""Connection budgets (oldest idle evicted, fresh ones protected, per address), the
rate-limited warnings and loop exception handler, and the [http] settings check."""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from novacron.config import Invalid
from novacron.connlimits import (
    ConnectionBudget,
    HttpLimits,
    LogLimiter,
    check_http_limits,
    rate_limited_exception_handler,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_oldest_idle_connection_makes_room_and_fresh_ones_are_protected() -> None:
    clock = Clock()
    closed: list[str] = []
    budget = ConnectionBudget(3, grace=1.0, clock=clock)
    slots = [budget.admit(f"10.0.0.{i}", lambda i=i: closed.append(f"c{i}")) for i in range(3)]
    assert all(slots) and budget.held == 3
    # all three are younger than the grace: the newcomer is refused, nobody is closed
    assert budget.admit("10.0.0.9", lambda: closed.append("new")) is None
    assert budget.refused == 1 and closed == []
    clock.now += 2
    assert slots[0] is not None and slots[1] is not None
    budget.busy(slots[0])  # serving a request: never evicted
    assert budget.admit("10.0.0.9", lambda: None) is not None
    assert closed == ["c1"] and budget.evicted == 1 and budget.held == 3
    budget.release(slots[1])  # the closed one's own release is a no-op
    assert budget.held == 3
    budget.idle(slots[0])  # idle again: youngest in line, protected for the grace period
    clock.now += 0.5
    assert budget.admit("10.0.0.8", lambda: None) is not None
    assert closed == ["c1", "c2"]


def test_per_address_limit_evicts_that_address_only() -> None:
    clock = Clock()
    closed: list[str] = []
    budget = ConnectionBudget(100, per_address=2, grace=1.0, clock=clock)
    budget.admit("victim", lambda: closed.append("victim"))
    for i in range(2):
        budget.admit("attacker", lambda i=i: closed.append(f"attacker{i}"))
    clock.now += 5
    # the attacker's third connection closes its own oldest one, not the victim's
    assert budget.admit("attacker", lambda: closed.append("attacker2")) is not None
    assert closed == ["attacker0"]
    clock.now += 0.1
    assert budget.admit("attacker", lambda: None) is not None  # attacker1 is old enough
    assert budget.admit("attacker", lambda: None) is None  # the rest are fresh: refused
    assert closed == ["attacker0", "attacker1"] and budget.refused == 1


def test_log_limiter_keeps_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("t.limit"), interval=10, clock=clock)
    with caplog.at_level(logging.WARNING, "t.limit"):
        for _ in range(1000):
            limiter.warning("k", "refused")
        clock.now += 11
        limiter.warning("k", "refused")
        limiter.warning("other", "another kind")
    assert [r.getMessage() for r in caplog.records] == ["refused", "refused", "another kind"]
    assert caplog.records[1].suppressed == 999  # type: ignore[attr-defined]


def test_accept_errors_are_logged_once_per_interval() -> None:
    loop = asyncio.new_event_loop()
    seen: list[str] = []
    loop.default_exception_handler = lambda ctx: seen.append(ctx["message"])  # type: ignore[method-assign]
    try:
        handler = rate_limited_exception_handler(interval=60)
        err = OSError(errno.EMFILE, "Too many open files")
        for _ in range(5000):
            handler(loop, {"message": "socket.accept() out of system resource", "exception": err})
        handler(loop, {"message": "something else", "exception": ValueError("x")})
    finally:
        loop.close()
    assert seen == ["socket.accept() out of system resource", "something else"]


@pytest.mark.parametrize(("limits", "key"), [
    (HttpLimits(header_timeout_s=0), "http.header_timeout_s"),
    (HttpLimits(idle_timeout_s=float("nan")), "http.idle_timeout_s"),
    (HttpLimits(max_connections=-1), "http.max_connections"),
])
def test_http_limits_checked(limits: HttpLimits, key: str) -> None:
    with pytest.raises(Invalid) as info:
        check_http_limits(limits)
    assert info.value.key == key
    check_http_limits(HttpLimits())
    assert HttpLimits().connections() >= 16
