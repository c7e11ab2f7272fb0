"""Bad input to the coordinator gets a 400 that says what is wrong and changes nothing:
non-finite numbers, names that only match the pattern up to a trailing newline,
JSON nested beyond reason. What it sends back is always standard JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest

from novacron import httpjson
from novacron.coordinator.api.keys import STORE
from novacron.coordinator.api.openapi import SchemaValidator
from novacron.coordinator.models import Host
from tests.coordinator.conftest import Coordinator

REGISTRATION: dict[str, Any] = {
    "name": "node1", "url": "http://127.0.0.1:9", "token": "node1-token-0123456789",
    "cpus": 4, "memory_bytes": 8 << 30, "memory_available_bytes": 4 << 30,
}


async def post_raw(coordinator: Coordinator, path: str, body: str, token: str) -> tuple[int, Any]:
    return await coordinator.call("POST", path, token=token, data=body.encode(),
                                  headers={"Content-Type": "application/json"})


async def hosts(coordinator: Coordinator) -> list[dict[str, Any]]:
    async with coordinator.session.get(coordinator.url + "/api/v1/hosts",
                                       headers=coordinator.headers()) as resp:
        assert resp.status == 200
        return httpjson.loads(await resp.read())["hosts"]  # strict: NaN would fail here


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
async def test_non_finite_numbers_are_refused_and_change_nothing(coordinator: Coordinator, number: str) -> None:
    agent_token = coordinator.cfg.agent_token
    status, doc = await post_raw(coordinator, "/hosts/register",
                                 json.dumps(REGISTRATION)[:-1] + f', "load": {number}}}', agent_token)
    assert status == 400 and "not valid JSON" in doc["error"], doc
    assert number.lstrip("-")[:3] in doc["error"]  # says which value
    assert await hosts(coordinator) == []
    assert (await post_raw(coordinator, "/hosts/register", json.dumps(REGISTRATION), agent_token))[0] == 200
    before = await hosts(coordinator)
    status, doc = await post_raw(coordinator, "/hosts/node1/heartbeat",
                                 f'{{"memory_available_bytes": 1, "load": {number}}}', agent_token)
    assert status == 400, doc
    after = await hosts(coordinator)
    assert after == before and after[0]["load"] is None and after[0]["memory_available_bytes"] == 4 << 30


async def test_a_stored_nan_is_sent_as_null(coordinator: Coordinator) -> None:
    """A record written before the reader was strict still lists as standard JSON."""
    app = coordinator.server.app
    assert app is not None
    await app[STORE].put_host(Host(**REGISTRATION, load=float("nan")))
    listed = await hosts(coordinator)
    assert listed[0]["name"] == "node1" and listed[0]["load"] is None
    status, doc = await coordinator.call("GET", "/hosts/node1")
    assert status == 200 and doc["load"] is None


@pytest.mark.parametrize("name", ["node1\n", "node1\r\n", "\nnode1", "node1\x00", "nöde1"])
async def test_host_names_must_match_fully(coordinator: Coordinator, name: str) -> None:
    status, doc = await coordinator.call("POST", "/hosts/register", token=coordinator.cfg.agent_token,
                                         json=dict(REGISTRATION, name=name))
    assert status == 400 and doc["error"].startswith("body.name:"), doc
    assert await hosts(coordinator) == []


@pytest.mark.parametrize("name", ["vm1\n", "vm1\n\n", "vm1 "])
async def test_vm_names_must_match_fully(coordinator: Coordinator, name: str) -> None:
    status, doc = await coordinator.call("POST", "/vms", json={"name": name, "vcpus": 1, "memory_mb": 64,
                                                             "kernel": "/k"})
    assert status == 400 and doc["error"].startswith("body.name:"), doc
    assert (await coordinator.call("GET", "/vms"))[1]["vms"] == []
    # and as a path segment
    status, doc = await coordinator.call("GET", "/vms/vm1%0A")
    assert status == 400 and "not a valid name" in doc["error"], doc


@pytest.mark.parametrize("depth", [65, 1000, 8000])
async def test_deeply_nested_json_is_a_400(coordinator: Coordinator, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = json.dumps(REGISTRATION)[:-1] + f', "accel": {{"x": {nested}}}}}'
    status, doc = await post_raw(coordinator, "/hosts/register", body, coordinator.cfg.agent_token)
    assert status == 400 and "nested deeper than" in doc["error"], doc
    assert await hosts(coordinator) == []


async def test_reasonable_nesting_still_works(coordinator: Coordinator) -> None:
    nested: Any = {"ok": True}
    for _ in range(20):
        nested = {"n": nested}
    status, doc = await coordinator.call("POST", "/hosts/register", token=coordinator.cfg.agent_token,
                                         json=dict(REGISTRATION, accel=nested))
    assert status == 200, doc


def test_strict_reader_and_writer() -> None:
    assert httpjson.loads(b'{"a": [1, 2.5, -0.0, 1e308]}') == {"a": [1, 2.5, -0.0, 1e308]}
    for bad in (b"NaN", b"[Infinity]", b'{"x": -Infinity}', b"1e400", b"\xff", b"[" * 70 + b"]" * 70):
        with pytest.raises(httpjson.BadJson):
            httpjson.loads(bad)
    assert httpjson.dumps({"a": [float("nan"), float("inf"), 1.5]}) == '{"a": [null, null, 1.5]}'


def test_schema_patterns_end_at_the_end_of_the_string() -> None:
    """``$`` in a schema pattern means the end (ECMA-262); a ``$`` escaped or in a class is a dollar."""
    check = SchemaValidator({"type": "string", "pattern": "^[a$]+\\$x$"})
    assert check.is_valid("a$a$x")
    assert not check.is_valid("a$x\n") and not check.is_valid("ax")
