"""The bandit policy: learns from outcomes, persists its state, refuses corrupt state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from novacron.coordinator.scheduler import FleetState, Scheduler, VMRequest
from novacron.coordinator.scheduler.learned import LearnedPlacer
from novacron.coordinator.scheduler.policy import ARMS, BanditPolicy, PolicyStateError
from tests.scheduler.conftest import host


def test_learns_the_rewarding_arm() -> None:
    pol = BanditPolicy()
    for i in range(300):
        arm = pol.choose("s/lo")
        pol.placed(f"v{i}", "s/lo", arm, powered_on_frac=0.0 if arm == "pack" else 1.0,
                   latency_frac=0.0)
        pol.departed(f"v{i}")
    assert pol.best_arm("s/lo") == "pack"
    assert pol.stats["s/lo"]["pack"].n > 150  # exploitation dominates


def test_migrations_and_rejections_lower_reward() -> None:
    pol = BanditPolicy()
    pol.placed("a", "c", "balanced", powered_on_frac=0.0, latency_frac=0.0)
    pol.migrated("a")
    pol.departed("a")
    pol.rejected("c", "pack")
    assert pol.stats["c"]["balanced"].mean == pytest.approx(0.7)
    assert pol.stats["c"]["pack"].mean == 0.0


def test_state_round_trips_through_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    fleet = FleetState([host(i) for i in range(3)])
    placer = LearnedPlacer(Scheduler(fleet), state_path=path)
    for i in range(10):
        d = placer.place(VMRequest(f"v{i}", 1, 512))
        assert d.explanation["policy"]["arm"] in ARMS
    for i in range(5):
        placer.departed(f"v{i}")
    placer.save()
    again = BanditPolicy.load(path)
    assert again.to_json() == placer.policy.to_json()
    assert len(again.pending) == 5 and sum(s.n for t in again.stats.values() for s in t.values()) == 5


def test_missing_file_is_a_fresh_policy_and_corrupt_file_an_error(tmp_path: Path) -> None:
    assert BanditPolicy.load(tmp_path / "none.json").stats == {}
    bad = tmp_path / "bad.json"
    for text in ("{", json.dumps({"version": 99}), json.dumps({"version": 1, "arms": ["x"], "stats": {}}),
                 json.dumps({"version": 1, "arms": ["pack"], "stats": {"c": {"pack": {"n": 1, "total": 5}}}})):
        bad.write_text(text)
        with pytest.raises(PolicyStateError, match=str(bad)):
            BanditPolicy.load(bad)
    # saving goes through a temp file that is renamed into place, never left behind
    good = tmp_path / "good.json"
    BanditPolicy().save(good)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
