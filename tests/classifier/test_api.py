"""POST /api/v1/tasks/classify and /tasks/plan against a real coordinator on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from novacron.coordinator.classifier.model import MAX_TEXT_CHARS
from tests.coordinator.conftest import Coordinator, make_cfg, start_coordinator, stop_coordinator


@pytest.fixture
async def coord(tmp_path: Path) -> AsyncIterator[Coordinator]:
    c = await start_coordinator(make_cfg(tmp_path, max_body_bytes=256 * 1024))
    try:
        yield c
    finally:
        await stop_coordinator(c)


async def test_classify_single_and_batch(coord: Coordinator) -> None:
    status, doc = await coord.call("POST", "/tasks/classify",
                                   json={"text": "Fix the typo in the README"})
    assert status == 200, doc
    assert doc["results"][0]["label"] == "simple"
    assert 0.0 < doc["results"][0]["confidence"] <= 1.0 and doc["results"][0]["reasons"]
    texts = ["Bump the nginx image tag to 1.25.4",
             "Shard the orders database across 16 nodes with online resharding"]
    status, doc = await coord.call("POST", "/tasks/classify",
                                   json={"tasks": [{"text": t} for t in texts]})
    assert status == 200, doc
    assert [r["label"] for r in doc["results"]] == ["simple", "very-complex"]


async def test_plan_batch(coord: Coordinator) -> None:
    status, doc = await coord.call("POST", "/tasks/plan", json={"tasks": [
        {"text": "Integrate PayPal as a payment method in checkout and the order service"},
        {"text": "Change the log level of one message to debug"}]})
    assert status == 200, doc
    big, small = doc["results"]
    assert big["agent_count"] > small["agent_count"]
    assert big["topology"] and big["estimated_duration"]["text"]


async def test_abstaining_answers_follow_the_schema(coord: Coordinator) -> None:
    """Under the calibrated threshold: label null, the best guess, a conservative plan."""
    import jsonschema

    from novacron.coordinator.api.tasks import PLAN, PREDICTION

    texts = ["Switch the reporting stack from nightly batches to streaming.",
             "Fix the typo in the README"]
    status, doc = await coord.call("POST", "/tasks/classify",
                                   json={"tasks": [{"text": t} for t in texts]})
    assert status == 200, doc
    unsure, sure = doc["results"]
    for res in doc["results"]:
        jsonschema.validate(res, PREDICTION)
    assert unsure["abstained"] and unsure["label"] is None and unsure["best_guess"]
    assert unsure["confidence"] < unsure["abstain_threshold"] <= sure["confidence"]
    assert not sure["abstained"] and sure["label"] == "simple"
    status, doc = await coord.call("POST", "/tasks/plan", json={"text": texts[0]})
    assert status == 200, doc
    plan = doc["results"][0]
    jsonschema.validate(plan, PLAN)
    levels = ["simple", "medium", "complex", "very-complex"]
    assert plan["abstained"] and plan["label"] is None
    assert levels.index(plan["planned_as"]) >= levels.index(unsure["best_guess"])


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"text": ""}, 400, "empty"),
    ({"text": "   "}, 400, "empty"),
    ({"text": "x" * (MAX_TEXT_CHARS + 1)}, 413, "too long"),
    ({"tasks": [{"text": "fine"}, {"text": " "}]}, 400, "tasks[1].text"),
    ({"tasks": [{"text": "fine"}, {"text": "x" * (MAX_TEXT_CHARS + 1)}]}, 413,
     "tasks[1].text: task description too long"),
    ({"tasks": []}, 400, "tasks"),
    ({}, 400, "body"),
    ({"text": "a", "tasks": [{"text": "b"}]}, 400, "body"),
    ({"text": 5}, 400, "text"),
    ({"txt": "typo"}, 400, "txt"),
])
async def test_bad_requests_get_clear_4xx(coord: Coordinator, body: dict, status: int,
                                          needle: str) -> None:
    for path in ("/tasks/classify", "/tasks/plan"):
        got, doc = await coord.call("POST", path, json=body)
        assert got == status, doc
        assert needle in doc["error"]


async def test_token_is_required(coord: Coordinator) -> None:
    status, _ = await coord.call("POST", "/tasks/classify", json={"text": "typo"},
                                 token="wrong-token")
    assert status == 401


async def test_routes_are_in_the_openapi_document(coord: Coordinator) -> None:
    status, doc = await coord.call("GET", "/openapi.json")
    assert status == 200
    assert "post" in doc["paths"]["/api/v1/tasks/classify"]
    assert "post" in doc["paths"]["/api/v1/tasks/plan"]


async def test_mcp_and_swarm_features_find_the_service(coord: Coordinator) -> None:
    from novacron.coordinator.api import keys

    service = coord.server.app[keys.CLASSIFIER]
    assert service.plan("Add SSO with Okta")["topology"]
