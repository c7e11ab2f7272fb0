"""``novacron place`` and ``novacron rebalance`` against a real coordinator subprocess."""

from __future__ import annotations

import json

import pytest

from novacron.coordinator.local import LocalCoordinator
from tests.coordinator.test_cli import cli, fleet

pytestmark = [pytest.mark.e2e]
__all__ = ["fleet"]  # the fixture, re-used


async def test_place_explains_and_changes_nothing(
        fleet: tuple[LocalCoordinator, dict[str, str]]) -> None:
    _coord, env = fleet
    code, out, err = await cli(env, "place", "--vcpus", "1", "--memory-mb", "512", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["placed"] and doc["host"] in ("alpha", "beta")
    assert doc["explanation"]["hosts_considered"] == 2
    code, out, err = await cli(env, "place", "--vcpus", "1", "--memory-mb", "512")
    assert code == 0 and doc["host"] in out, err
    # too big for any host: exit 1 with the reason
    code, out, err = await cli(env, "place", "--vcpus", "1", "--memory-mb", str(64 << 10))
    assert code == 1 and "nowhere" in out and "memory" in out.lower(), out + err
    code, out, _ = await cli(env, "vms", "--json")
    assert [v["name"] for v in json.loads(out)] == ["web"]  # dry runs placed nothing


async def test_bad_place_request_is_one_line(fleet: tuple[LocalCoordinator, dict[str, str]]) -> None:
    _coord, env = fleet
    code, _out, err = await cli(env, "place", "--vcpus", "0", "--memory-mb", "512")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "vcpus" in err


async def test_rebalance_prints_a_plan(fleet: tuple[LocalCoordinator, dict[str, str]]) -> None:
    _coord, env = fleet
    code, out, err = await cli(env, "rebalance", "--json", "--max-migrations", "3")
    assert code == 0, err
    plan = json.loads(out)
    assert len(plan["moves"]) <= 3 and set(plan) >= {"hosts_freed", "capped"}
    code, out, err = await cli(env, "rebalance")
    assert code == 0 and out.strip(), err
