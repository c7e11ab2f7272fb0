"""Simple placement: the up host with the most free memory that fits the VM.

This is the stand-in until ``novacron.coordinator.scheduler`` provides a real
scheduler; anything with the ``Placer`` signature can be put on the app under
``PLACER`` (see ``novacron.coordinator.api.keys``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from novacron.coordinator.models import HOST_UP, VM, Host, cpu_model_problem, spec_networks

# (VM spec, candidate hosts, VMs already placed) -> chosen host or None if none fits
Placer = Callable[[dict[str, Any], list[Host], list[VM]], Awaitable[Host | None]]


def free_memory(host: Host, vms: list[VM]) -> int:
    """Memory left on ``host``: its report, less VMs placed there it has not reported yet."""
    pending = sum(int(v.spec.get("memory_mb", 0)) << 20 for v in vms
                  if v.host == host.name and v.name not in host.vms)
    return host.memory_available_bytes - pending


async def most_free_memory(spec: dict[str, Any], hosts: list[Host], vms: list[VM]) -> Host | None:
    need = int(spec["memory_mb"]) << 20
    fits = [h for h in hosts if h.state == HOST_UP and free_memory(h, vms) >= need
            and h.cpus >= int(spec.get("vcpus", 1)) and set(spec_networks(spec)) <= set(h.networks)
            and cpu_model_problem(spec, h) is None]
    if not fits:
        return None
    return max(fits, key=lambda h: (free_memory(h, vms), h.name))
