"""From a prediction to a swarm plan: topology, agents and an estimated duration.

Every rule is in ``PLAN_RULES`` below; the code only applies it. The plan's
``topology``/``strategy``/``max_agents``/``agents``/``tasks`` fields are what
the claude-flow bridge (``POST /api/v1/swarms``) executes; the rest explains it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from novacron.coordinator.classifier.model import Prediction

# ------------------------------------------------------------------ the rules

PLAN_RULES: dict[str, Any] = {
    # One row per label: how a task of that size is staffed and how long it takes
    # (working hours, low..high, from the rubric: <1 h, hours to a day, days, weeks).
    "levels": {
        "simple": {
            "topology": "star", "strategy": "balanced", "priority": "low",
            "agents": {"coder": 1, "reviewer": 1},
            "hours": (0.25, 1.0),
        },
        "medium": {
            "topology": "star", "strategy": "balanced", "priority": "normal",
            "agents": {"coder": 1, "tester": 1, "reviewer": 1},
            "hours": (2.0, 8.0),
        },
        "complex": {
            "topology": "hierarchical", "strategy": "specialized", "priority": "high",
            "agents": {"hierarchical-coordinator": 1, "system-architect": 1, "coder": 2,
                       "tester": 1, "reviewer": 1},
            "hours": (16.0, 64.0),
        },
        "very-complex": {
            "topology": "hierarchical-mesh", "strategy": "adaptive", "priority": "critical",
            "agents": {"hierarchical-coordinator": 1, "system-architect": 1, "researcher": 1,
                       "coder": 4, "tester": 2, "reviewer": 1},
            "hours": (80.0, 320.0),
        },
    },
    # Specialists added when the description shows a concern (a scope feature of
    # novacron.models.features fires), for tasks at or above a minimum level.
    "specialists": [
        {"feature": "security_critical", "agent": "security-architect", "min_level": "medium"},
        {"feature": "security_cues", "agent": "security-auditor", "min_level": "complex"},
        {"feature": "performance_cues", "agent": "performance-engineer", "min_level": "complex"},
        {"feature": "docs_cues", "agent": "researcher", "min_level": "complex"},
        {"feature": "testing_cues", "agent": "tester", "min_level": "complex"},
    ],
    # When the model is unsure, add a reviewer and widen the estimate to every
    # label with at least this probability.
    "low_confidence": {"below": 0.6, "extra_agent": "reviewer", "estimate_min_probability": 0.15},
    # When the classifier abstains (top probability under its calibrated
    # threshold), plan conservatively: staff for the largest level that still
    # has at least this probability (never below the best guess), with the
    # low-confidence reviewer, and estimate across every plausible level.
    "abstain": {"plausible_min_probability": 0.15},
    # Never ask the bridge for more agents than this.
    "max_agents": 12,
}

LEVELS: tuple[str, ...] = tuple(PLAN_RULES["levels"])
HOURS_PER_DAY = 8.0


# ------------------------------------------------------------------ applying them

@dataclass
class ScopeSignals:
    """Which scope features fired for the description (raw value > 0)."""

    fired: dict[str, tuple[str, ...]]


def _duration_text(hours: float) -> str:
    if hours < 1.0:
        return f"{max(5, round(hours * 60 / 5) * 5)} min"
    if hours < HOURS_PER_DAY:
        return f"{hours:.0f} h" if hours >= 2 else f"{hours:.1f} h"
    days = hours / HOURS_PER_DAY
    if days < 10:
        return f"{days:.0f} days" if days >= 2 else f"{days:.1f} days"
    return f"{days / 5:.0f} weeks"


def planned_level(prediction: Prediction) -> str:
    """The level a plan is built for: the label, or when the classifier abstained the
    largest plausible level (conservative: more staff and time rather than too little)."""
    if not prediction.abstained:
        return prediction.best_guess
    cutoff = PLAN_RULES["abstain"]["plausible_min_probability"]
    plausible = [lab for lab, p in prediction.probabilities.items() if p >= cutoff]
    return max([*plausible, prediction.best_guess], key=LEVELS.index)


def estimate(prediction: Prediction) -> dict[str, Any]:
    """Probability-weighted duration: geometric midpoints mixed by the calibrated probabilities."""
    rules = PLAN_RULES["levels"]
    expected_log = sum(p * math.log(math.sqrt(rules[lab]["hours"][0] * rules[lab]["hours"][1]))
                       for lab, p in prediction.probabilities.items())
    expected = math.exp(expected_log)
    cutoff = PLAN_RULES["low_confidence"]["estimate_min_probability"]
    if prediction.abstained or prediction.confidence < PLAN_RULES["low_confidence"]["below"]:
        likely = [lab for lab, p in prediction.probabilities.items() if p >= cutoff]
        likely.append(planned_level(prediction))
    else:
        likely = [prediction.best_guess]
    low = min(rules[lab]["hours"][0] for lab in likely)
    high = max(rules[lab]["hours"][1] for lab in likely)
    expected = min(max(expected, low), high)
    return {"low_hours": low, "expected_hours": round(expected, 2), "high_hours": high,
            "text": f"{_duration_text(low)} – {_duration_text(high)} "
                    f"(expected ~{_duration_text(expected)})"}


def build_plan(text: str, prediction: Prediction, signals: ScopeSignals) -> dict[str, Any]:
    name = planned_level(prediction)
    level = PLAN_RULES["levels"][name]
    rank = LEVELS.index(name)
    team: Counter[str] = Counter(level["agents"])
    if prediction.abstained:
        why: dict[str, str] = {
            a: f"classifier abstained (confidence {prediction.confidence:.2f}); planned "
               f"conservatively as {name}, which gets {n}" for a, n in team.items()}
    else:
        why = {a: f"{name} tasks get {n}" for a, n in team.items()}
    for rule in PLAN_RULES["specialists"]:
        if rank >= LEVELS.index(rule["min_level"]) and rule["feature"] in signals.fired:
            agent = rule["agent"]
            terms = ", ".join(signals.fired[rule["feature"]][:3])
            team[agent] += 1
            why[agent] = f"description mentions {terms}"
    low_conf = PLAN_RULES["low_confidence"]
    if prediction.abstained or prediction.confidence < low_conf["below"]:
        team[low_conf["extra_agent"]] += 1
        bar = prediction.abstain_threshold if prediction.abstained else low_conf["below"]
        why[low_conf["extra_agent"]] = (f"confidence {prediction.confidence:.2f} is below "
                                        f"{bar}: an extra review")
    # Trim the largest groups first if specialists pushed the team over the cap.
    while sum(team.values()) > PLAN_RULES["max_agents"]:
        team[team.most_common(1)[0][0]] -= 1
    team = +team
    agents = [{"type": a} for a, n in team.items() for _ in range(n)]
    return {
        "label": prediction.label,
        "abstained": prediction.abstained,
        "best_guess": prediction.best_guess,
        "abstain_threshold": prediction.abstain_threshold,
        "planned_as": name,
        "confidence": round(prediction.confidence, 4),
        "topology": level["topology"],
        "strategy": level["strategy"],
        "max_agents": len(agents),
        "agents": agents,
        "team": [{"type": a, "count": n, "why": why[a]} for a, n in team.items()],
        "agent_count": len(agents),
        "tasks": [{"description": text[:4000], "type": name.replace("-", "_"),
                   "priority": level["priority"]}],
        "estimated_duration": estimate(prediction),
        "reasons": prediction.reasons,
    }
