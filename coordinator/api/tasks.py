"""Task classification and swarm planning: ``POST /tasks/classify`` and ``POST /tasks/plan``.

Both take one description (``{"text": ...}``) or a batch
(``{"tasks": [{"text": ...}, ...]}``) and answer ``{"results": [...]}`` in the
same order. An empty description is a 400, one longer than
``MAX_TEXT_CHARS`` a 413; nothing is classified when any item is bad.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from novacron.coordinator.api import keys
from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.api.openapi import RouteTable, json_body
from novacron.coordinator.classifier.limits import (
    MAX_BATCH,
    MAX_TEXT_CHARS,
    InvalidTask,
    TaskTooLong,
    check_text,
)
from novacron.coordinator.classifier.service import TaskService

log = logging.getLogger("novacron.coordinator.api.tasks")

routes = RouteTable("tasks", "Task-complexity classification and swarm plans")

CLASSIFIER = keys.CLASSIFIER  # also used by the MCP tools and POST /swarms

_TEXT: dict[str, Any] = {
    "type": "string",
    "description": f"the task in plain language (1..{MAX_TEXT_CHARS} characters)",
}
REQUEST: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "text": _TEXT,
        "tasks": {
            "type": "array", "minItems": 1, "maxItems": MAX_BATCH,
            "items": {"type": "object", "additionalProperties": False, "required": ["text"],
                      "properties": {"text": _TEXT}},
        },
    },
    "oneOf": [{"required": ["text"]}, {"required": ["tasks"]}],
}
_LABEL = {"enum": ["simple", "medium", "complex", "very-complex"]}
PREDICTION: dict[str, Any] = {
    "type": "object",
    "required": ["label", "abstained", "best_guess", "confidence", "abstain_threshold",
                 "probabilities", "reasons"],
    "properties": {
        # null when the classifier abstains (confidence below abstain_threshold)
        "label": {"oneOf": [_LABEL, {"type": "null"}]},
        "abstained": {"type": "boolean"},
        "best_guess": _LABEL,
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "abstain_threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "probabilities": {"type": "object", "additionalProperties": {"type": "number"}},
        "reasons": {"type": "array", "items": {"type": "string"}},
    },
}
PLAN: dict[str, Any] = {
    "type": "object",
    "required": ["label", "abstained", "planned_as", "confidence", "topology", "strategy",
                 "max_agents", "agents", "tasks", "estimated_duration"],
    "properties": {
        "label": {"oneOf": [_LABEL, {"type": "null"}]}, "abstained": {"type": "boolean"},
        "planned_as": _LABEL, "best_guess": _LABEL, "confidence": {"type": "number"},
        "abstain_threshold": {"type": "number"},
        "topology": {"type": "string"}, "strategy": {"type": "string"},
        "max_agents": {"type": "integer"}, "agent_count": {"type": "integer"},
        "agents": {"type": "array", "items": {"type": "object"}},
        "team": {"type": "array", "items": {"type": "object"}},
        "tasks": {"type": "array", "items": {"type": "object"}},
        "estimated_duration": {"type": "object"},
        "reasons": {"type": "array", "items": {"type": "string"}},
    },
}


def _results(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["results"],
            "properties": {"results": {"type": "array", "items": items}}}


def _texts(body: dict[str, Any]) -> list[str]:
    texts = [body["text"]] if "text" in body else [t["text"] for t in body["tasks"]]
    for i, text in enumerate(texts):
        try:
            check_text(text, "text" if "text" in body else f"tasks[{i}].text")
        except TaskTooLong as exc:
            raise ApiError(413, str(exc)) from None
        except InvalidTask as exc:
            raise ApiError(400, str(exc)) from None
    return texts


def _service(request: web.Request) -> TaskService:
    service = request.app.get(CLASSIFIER)
    if service is None:
        raise ApiError(503, "the task classifier is not loaded on this coordinator")
    return service


@routes.post("/tasks/classify", "Classify task descriptions: label, calibrated confidence, "
             "reasons", request=REQUEST, response=_results(PREDICTION), errors=(413, 503))
async def classify(request: web.Request) -> web.Response:
    texts = _texts(json_body(request))
    try:
        results = _service(request).classify_many(texts)
    except InvalidTask as exc:
        raise ApiError(400, str(exc)) from None
    log.info("tasks classified", extra={"count": len(results),
                                        "labels": [r["label"] for r in results][:16]})
    return web.json_response({"results": results})


@routes.post("/tasks/plan", "Plan an agent swarm for task descriptions: topology, agents, "
             "estimated duration", request=REQUEST, response=_results(PLAN), errors=(413, 503))
async def plan(request: web.Request) -> web.Response:
    texts = _texts(json_body(request))
    try:
        results = _service(request).plan_many(texts)
    except InvalidTask as exc:
        raise ApiError(400, str(exc)) from None
    log.info("tasks planned", extra={"count": len(results)})
    return web.json_response({"results": results})


def setup(app: web.Application) -> None:
    app[CLASSIFIER] = TaskService()
