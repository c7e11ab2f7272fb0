"""Token-bucket bandwidth limiter for the page stream (bytes per second)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

SLICE_S = 0.05  # longest sleep before the current rate is looked at again


class TokenBucket:
    """Bytes/s limiter whose rate can change while a transfer runs.

    ``rate_bytes_per_s`` 0 means unlimited. ``burst`` (default: 100 ms of traffic,
    at least 64 KiB) is how many bytes may go out at once after an idle spell.
    A reservation larger than the bucket is allowed and puts the bucket in debt,
    so callers never deadlock on a frame bigger than ``burst``.
    """

    def __init__(
        self,
        rate_bytes_per_s: float,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._explicit_burst = burst
        if burst is not None and burst <= 0:
            raise ValueError(f"burst must be positive, got {burst}")
        self._rate = 0.0
        self._burst = 0.0
        self._tokens = 0.0
        self._last = clock()
        self.set_rate(rate_bytes_per_s)
        self._tokens = self._burst  # a fresh bucket starts full

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def set_rate(self, rate_bytes_per_s: float) -> None:
        """Change the rate; tokens earned so far are kept (capped by the new burst)."""
        rate = float(rate_bytes_per_s)
        if not rate >= 0 or rate == float("inf"):
            raise ValueError(f"rate must be a finite number >= 0 bytes/s, got {rate_bytes_per_s!r}")
        self._refill()
        self._rate = rate
        if self._explicit_burst is not None:
            self._burst = float(self._explicit_burst)
        else:
            self._burst = max(65536.0, rate / 10)
        self._tokens = min(self._tokens, self._burst)

    def _refill(self) -> None:
        now = self._clock()
        if self._rate > 0:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def delay_for(self, n: int) -> float:
        """Reserve ``n`` bytes now; return how many seconds to wait before sending them."""
        if n < 0:
            raise ValueError(f"cannot reserve a negative byte count ({n})")
        if self._rate == 0:
            return 0.0
        self._refill()
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    def would_wait(self, n: int) -> bool:
        """Whether ``n`` bytes reserved now would have to wait (reserves nothing)."""
        if self._rate == 0:
            return False
        self._refill()
        return self._tokens < n

    async def acquire(self, n: int) -> bool:
        """Wait until ``n`` bytes may be sent under the current rate. Waits in short
        slices, so a rate changed meanwhile (raised, or 0 = unlimited) applies at once.
        Returns whether it had to wait (False: the bytes fit in the tokens at hand)."""
        delay = self.delay_for(n)
        waited = delay > 0
        while delay > 0:
            await asyncio.sleep(min(delay, SLICE_S))
            delay = self._debt_delay()
        return waited

    def _debt_delay(self) -> float:
        if self._rate == 0:
            return 0.0
        self._refill()
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate
