"""Issue 11 against a real coordinator (fake agents behind it): one identity per host
name, and a migration's source gets a grant, never the destination's token."""

from __future__ import annotations

import json
from typing import Any

import pytest

from novacron.grants import GrantVerifier
from tests.coordinator.conftest import Coordinator
from tests.coordinator.fake_agent import FakeAgent

# -- one identity per host (token identities, in-process coordinator) -----------------


async def test_host_takeover_is_refused_and_an_admin_can_retire(
        coordinator: Coordinator, agents: list[FakeAgent], caplog: pytest.LogCaptureFixture) -> None:
    alpha = agents[0]
    impostor = dict(alpha.registration(), url="http://127.0.0.1:9", token="impostor-token-0123456789")
    bootstrap = coordinator.cfg.agent_token
    status, doc = await coordinator.call("POST", "/hosts/register", json=impostor, token=bootstrap)
    assert status == 403 and "bound to another identity" in doc["error"]
    status, _ = await coordinator.call("POST", "/hosts/alpha/heartbeat", token=impostor["token"],
                                       json={"memory_available_bytes": 1})
    assert status == 403
    assert any("bound to another identity" in r.getMessage() and getattr(r, "remote", None) == "127.0.0.1"
               for r in caplog.records)
    host = (await coordinator.call("GET", "/hosts/alpha"))[1]
    assert host["url"] == alpha.url and host["memory_available_bytes"] != 1  # nothing changed
    status, _ = await coordinator.call("POST", "/hosts/alpha/heartbeat", token=alpha.token,
                                       json={"memory_available_bytes": 1 << 20})
    assert status == 200  # the original still works
    status, _ = await coordinator.call("POST", "/hosts/register", json=alpha.registration(),
                                       token=bootstrap)
    assert status == 200  # and may re-register
    # Forgetting the record keeps the binding; retiring releases it.
    assert (await coordinator.call("DELETE", "/hosts/alpha"))[0] == 200
    assert (await coordinator.call("POST", "/hosts/register", json=impostor, token=bootstrap))[0] == 403
    status, doc = await coordinator.call("DELETE", "/hosts/alpha?retire=true")
    assert status == 200 and doc == {"deleted": "alpha", "retired": True}
    assert (await coordinator.call("POST", "/hosts/register", json=impostor, token=bootstrap))[0] == 200
    # A short per-host token is no identity.
    status, _ = await coordinator.call("POST", "/hosts/register", token=bootstrap,
                                       json=dict(alpha.registration(), name="gamma", token="short"))
    assert status == 400


# -- no credential forwarding ------------------------------------------------------------


def _strings(doc: Any) -> list[str]:
    if isinstance(doc, dict):
        return [*doc.keys(), *(s for v in doc.values() for s in _strings(v))]
    if isinstance(doc, list):
        return [s for v in doc for s in _strings(v)]
    return [doc] if isinstance(doc, str) else []


async def test_migration_request_carries_a_grant_not_the_destination_token(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    alpha, beta = agents
    status, _ = await coordinator.call("POST", "/vms", json={
        "name": "g1", "vcpus": 1, "memory_mb": 256, "host": "alpha",
        "kernel": "/boot/vmlinuz", "initrd": "/boot/initrd", "cmdline": "console=ttyS0"})
    assert status == 201
    # Callers name a host; a URL is not a host name.
    status, _ = await coordinator.call("POST", "/migrations", json={"vm": "g1", "target": beta.url})
    assert status == 400
    status, mig = await coordinator.call("POST", "/migrations", json={"vm": "g1", "target": "beta"})
    assert status == 202, mig
    (sent,) = alpha.migration_requests
    assert set(sent) == {"vm", "grant", "options"}
    assert not any("token" in s.lower() for s in _strings(sent))
    assert beta.token not in json.dumps(sent)
    grant = GrantVerifier(alpha.grant_key).verify(sent["grant"])
    assert (grant.vm, grant.source, grant.target, grant.url) == ("g1", "alpha", "beta", beta.url)
    assert grant.migration == mig["id"] and 0 < grant.expires - grant.issued <= 60
    assert (grant.data_host, grant.data_port) == ("127.0.0.1", 1234)  # from the registry
