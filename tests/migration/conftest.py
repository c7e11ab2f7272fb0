"""Each test starts with nothing learned from earlier hand-overs (estimate.learned)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from novacron.agent.migration import estimate


@pytest.fixture(autouse=True)
def _fresh_estimates() -> Iterator[None]:
    estimate.LEARNED.clear()
    yield
    estimate.LEARNED.clear()
