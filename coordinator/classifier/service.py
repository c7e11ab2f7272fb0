"""``TaskService``: the classifier and the planner behind one object.

The API (``novacron.coordinator.api.tasks``), the MCP tools and the CLI all go
through it, so they answer the same thing for the same text.
"""

from __future__ import annotations

from typing import Any

from novacron.coordinator.classifier.model import TaskClassifier, default_classifier
from novacron.coordinator.classifier.planner import ScopeSignals, build_plan
from novacron.models.features import SCOPE_FEATURE_NAMES, scope_features


class TaskService:
    def __init__(self, classifier: TaskClassifier | None = None) -> None:
        self.classifier = classifier or default_classifier()

    def classify(self, text: str) -> dict[str, Any]:
        return self.classifier.classify(text).to_dict()

    def classify_many(self, texts: list[str]) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.classifier.classify_batch(texts)]

    def plan(self, text: str) -> dict[str, Any]:
        return self.plan_many([text])[0]

    def plan_many(self, texts: list[str]) -> list[dict[str, Any]]:
        predictions = self.classifier.classify_batch(texts)
        plans = []
        for text, pred in zip(texts, predictions, strict=True):
            # classify_batch keeps the scope features it computed: no second pass
            raw, terms = pred.scope if pred.scope is not None else scope_features(text)
            fired = {name: terms[i] for i, name in enumerate(SCOPE_FEATURE_NAMES)
                     if raw[i] > 0}
            plans.append(build_plan(text, pred, ScopeSignals(fired)))
        return plans
