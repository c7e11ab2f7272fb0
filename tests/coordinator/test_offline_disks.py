"""An offline migration never moves a VM whose local disks it cannot copy: the target
would create them empty and the source would delete the originals."""

from __future__ import annotations

import pytest

from novacron.coordinator.agent_client import AgentError
from novacron.coordinator.migrations import copy_disks_offline
from novacron.coordinator.models import Host


def _host(name: str) -> Host:
    return Host(name=name, url=f"http://127.0.0.1:1/{name}", token="t" * 16, cpus=1,
                memory_bytes=1 << 30, memory_available_bytes=1 << 30)


async def test_local_disks_refuse_an_offline_move_and_shared_ones_do_not() -> None:
    a, b = _host("a"), _host("b")
    spec = {"name": "v", "disks": [{"storage": "shared", "image": "nfs/x.raw"},
                                   {"storage": "local", "size_gb": 1}]}
    with pytest.raises(AgentError) as err:
        await copy_disks_offline(None, a, b, spec)  # type: ignore[arg-type]
    assert err.value.status == 409 and "disks[1]" in err.value.message
    await copy_disks_offline(None, a, b, {"name": "v", "disks": [spec["disks"][0]]})  # type: ignore[arg-type]
    await copy_disks_offline(None, a, b, {"name": "v"})  # type: ignore[arg-type]
