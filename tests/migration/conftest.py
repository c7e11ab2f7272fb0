"""Each test starts with nothing learned from earlier hand-overs (estimate.learned)
and no link shared with an earlier test's migrations (estimate.link_share)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from novacron.agent.migration import estimate


@pytest.fixture(autouse=True)
def _fresh_estimates() -> Iterator[None]:
    estimate.LEARNED.clear()
    estimate.SHARES.clear()
    yield
    estimate.LEARNED.clear()
    estimate.SHARES.clear()
