"""The swarm planner: rules from PLAN_RULES, specialists, low confidence, bridge-compatible plans."""

from __future__ import annotations

import jsonschema
import pytest

from novacron.coordinator.classifier.model import Prediction
from novacron.coordinator.classifier.planner import (
    PLAN_RULES,
    ScopeSignals,
    build_plan,
    estimate,
)
from novacron.coordinator.classifier.service import TaskService

LABELS = ("simple", "medium", "complex", "very-complex")


def _pred(label: str, confidence: float = 0.95) -> Prediction:
    rest = (1.0 - confidence) / 3
    probs = {lab: (confidence if lab == label else rest) for lab in LABELS}
    return Prediction(label, confidence, probs, ["because"])


@pytest.mark.parametrize("label", LABELS)
def test_each_level_follows_its_row(label: str) -> None:
    rule = PLAN_RULES["levels"][label]
    plan = build_plan("some task", _pred(label), ScopeSignals({}))
    assert plan["topology"] == rule["topology"]
    assert plan["strategy"] == rule["strategy"]
    assert plan["agent_count"] == sum(rule["agents"].values()) == len(plan["agents"])
    low, high = rule["hours"]
    est = plan["estimated_duration"]
    assert est["low_hours"] == low and est["high_hours"] == high
    assert low <= est["expected_hours"] <= high
    assert plan["tasks"][0]["description"] == "some task"


def test_bigger_tasks_get_bigger_teams_and_longer_estimates() -> None:
    plans = [build_plan("t", _pred(lab), ScopeSignals({})) for lab in LABELS]
    counts = [p["agent_count"] for p in plans]
    hours = [p["estimated_duration"]["expected_hours"] for p in plans]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    assert hours == sorted(hours) and hours[-1] > 20 * hours[0]


def test_specialists_join_only_from_their_level() -> None:
    signals = ScopeSignals({"security_critical": ("key management",)})
    simple = build_plan("t", _pred("simple"), signals)
    medium = build_plan("t", _pred("medium"), signals)
    assert "security-architect" not in {a["type"] for a in simple["agents"]}
    team = {t["type"]: t for t in medium["team"]}
    assert "key management" in team["security-architect"]["why"]


def test_low_confidence_adds_a_reviewer_and_widens_the_estimate() -> None:
    unsure = Prediction("medium", 0.5, {"simple": 0.05, "medium": 0.5, "complex": 0.4,
                                        "very-complex": 0.05}, [])
    plan = build_plan("t", unsure, ScopeSignals({}))
    sure = build_plan("t", _pred("medium"), ScopeSignals({}))
    assert plan["agent_count"] == sure["agent_count"] + 1
    assert plan["estimated_duration"]["high_hours"] == PLAN_RULES["levels"]["complex"]["hours"][1]
    assert "below" in {t["type"]: t for t in plan["team"]}["reviewer"]["why"]


def test_abstained_prediction_gets_a_conservative_plan() -> None:
    probs = {"simple": 0.05, "medium": 0.42, "complex": 0.38, "very-complex": 0.15}
    unsure = Prediction(None, 0.42, probs, [], abstained=True, best_guess="medium",
                        abstain_threshold=0.55)
    plan = build_plan("t", unsure, ScopeSignals({}))
    # staffed as the largest plausible level (p >= 0.15), not the best guess
    assert plan["label"] is None and plan["abstained"] and plan["planned_as"] == "very-complex"
    assert plan["topology"] == PLAN_RULES["levels"]["very-complex"]["topology"]
    assert plan["tasks"][0]["type"] == "very_complex"
    team = {t["type"]: t for t in plan["team"]}
    assert "abstained" in team["coder"]["why"] and "0.55" in team["reviewer"]["why"]
    rules = PLAN_RULES["levels"]
    assert plan["estimated_duration"]["low_hours"] == rules["medium"]["hours"][0]
    assert plan["estimated_duration"]["high_hours"] == rules["very-complex"]["hours"][1]
    # the same probabilities without abstaining plan the best guess
    sure = Prediction("medium", 0.42, probs, [], best_guess="medium")
    assert build_plan("t", sure, ScopeSignals({}))["planned_as"] == "medium"


def test_abstained_plan_never_plans_below_the_best_guess() -> None:
    probs = {"simple": 0.1, "medium": 0.1, "complex": 0.4, "very-complex": 0.4}
    unsure = Prediction(None, 0.4, probs, [], abstained=True, best_guess="complex")
    assert build_plan("t", unsure, ScopeSignals({}))["planned_as"] == "very-complex"
    flat = Prediction(None, 0.3, {"simple": 0.3, "medium": 0.25, "complex": 0.25,
                                  "very-complex": 0.2}, [], abstained=True, best_guess="simple")
    assert build_plan("t", flat, ScopeSignals({}))["planned_as"] == "very-complex"


def test_team_never_exceeds_the_cap() -> None:
    fired = {r["feature"]: ("x",) for r in PLAN_RULES["specialists"]}
    unsure = Prediction("very-complex", 0.4, {"simple": 0.1, "medium": 0.1, "complex": 0.4,
                                              "very-complex": 0.4}, [])
    plan = build_plan("t", unsure, ScopeSignals(fired))
    assert plan["agent_count"] <= PLAN_RULES["max_agents"]


def test_estimate_text_is_readable() -> None:
    assert "min" in estimate(_pred("simple"))["text"]
    assert "weeks" in estimate(_pred("very-complex"))["text"]


def test_service_plans_are_accepted_by_the_swarm_bridge_schema() -> None:
    from novacron.coordinator.api.swarms import PLAN

    service = TaskService()
    for text in ("Fix the typo in the README",
                 "Add end-to-end encryption with key rotation to all messaging services "
                 "across every region"):
        plan = service.plan(text)
        bridge_part = {k: plan[k] for k in ("topology", "strategy", "max_agents", "agents",
                                            "tasks")}
        jsonschema.validate(bridge_part, PLAN)


def test_plans_reuse_the_scope_features_of_the_classification(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The planner reads the same scope signals the model saw, computed once per text."""
    import novacron.coordinator.classifier.service as service_mod
    import novacron.models.features as features_mod

    text = "Build a multi-region active-active database with automatic failover"
    service = service_mod.TaskService()
    expected = service.plan(text)
    calls = []
    real = features_mod.scope_features

    def counting(t: str) -> tuple[object, object]:
        calls.append(t)
        return real(t)

    monkeypatch.setattr(features_mod, "scope_features", counting)
    monkeypatch.setattr(service_mod, "scope_features", counting)
    assert service.plan(text) == expected
    assert calls == [text]
