"""An offline migration of a VM with local disks hands the copy to the source agent under
a grant for the target, follows it, and fails (nothing moved) when the agent's copy
fails. The copy itself, with real agents and a guest: tests/disks/test_offline_migration.py."""

from __future__ import annotations

from typing import Any

import pytest

from novacron.coordinator.agent_client import AgentError
from novacron.coordinator.migrations import copy_disks_offline, local_disks
from novacron.coordinator.models import Host, Migration
from novacron.grants import GrantSigner, GrantVerifier


def _host(name: str) -> Host:
    return Host(name=name, url=f"http://127.0.0.{len(name)}:1/{name}", token="t" * 16, cpus=1,
                memory_bytes=1 << 30, memory_available_bytes=1 << 30, data_port=7001)


class SourceAgent:
    """Answers the coordinator's calls as a source agent running the copy would."""

    def __init__(self, phases: list[dict[str, Any]]) -> None:
        self.phases = phases
        self.calls: list[tuple[str, str, Any]] = []

    async def call(self, host: str, url: str, token: str, method: str, path: str, body: Any = None,
                   timeout_s: float = 30) -> Any:
        self.calls.append((method, path, body))
        if method == "POST":
            return {"id": "m1", "phase": "prepare"}
        if not self.phases:
            raise AgentError(host, "no migration 'm1'", 404)
        return self.phases.pop(0) if len(self.phases) > 1 else self.phases[0]


def test_which_disks_are_copied() -> None:
    spec = {"name": "v", "disks": [{"storage": "shared", "image": "nfs/x.raw"}, {"size_gb": 1},
                                   {"storage": "local", "backing": "b.qcow2"}]}
    assert local_disks(spec) == [1, 2]
    assert local_disks({"name": "v"}) == []


async def test_the_copy_runs_at_the_source_under_a_grant_for_the_target() -> None:
    signer = GrantSigner.generate()
    agent = SourceAgent([{"phase": "precopy"}, {"phase": "commit"}, {"phase": "completed"}])
    mig = Migration(id="m1", vm="v", source="a", target="b",
                    options={"offline": True, "on_no_converge": "postcopy", "timeout_s": 60.0})
    await copy_disks_offline(agent, signer, mig, _host("a"), _host("b"),  # type: ignore[arg-type]
                             poll_s=0.001)
    method, path, body = agent.calls[0]
    assert (method, path) == ("POST", "/v1/migrations")
    # a policy's live-migration options are not the copy's
    assert body["vm"] == "v" and body["options"] == {"offline": True, "timeout_s": 60.0}
    grant = GrantVerifier(signer.public_key).verify(body["grant"])
    assert (grant.migration, grant.vm, grant.source, grant.target) == ("m1", "v", "a", "b")
    assert [c[1] for c in agent.calls[1:]] == ["/v1/migrations/m1"] * 3


async def test_a_failed_copy_fails_the_migration_with_the_agents_reason() -> None:
    agent = SourceAgent([{"phase": "precopy"},
                         {"phase": "failed", "error": "offline migration failed: destination: no space"}])
    mig = Migration(id="m2", vm="v", source="a", target="b", options={"offline": True})
    with pytest.raises(AgentError) as err:
        await copy_disks_offline(agent, GrantSigner.generate(), mig, _host("a"), _host("b"),  # type: ignore[arg-type]
                                 poll_s=0.001)
    assert err.value.status == 409 and "no space" in err.value.message



async def test_a_copy_the_source_does_not_know_fails_at_once() -> None:
    mig = Migration(id="m3", vm="v", source="a", target="b", options={"offline": True})
    with pytest.raises(AgentError) as err:
        await copy_disks_offline(SourceAgent([]), GrantSigner.generate(), mig, _host("a"), _host("b"),  # type: ignore[arg-type]
                                 poll_s=0.001)
    assert err.value.status == 409 and "did not start" in err.value.message
