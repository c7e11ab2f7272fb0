"""Simple placement: the up host with the most free memory that fits the VM.

This is the stand-in until ``novacron.coordinator.scheduler`` provides a real
scheduler; anything with the ``Placer`` signature can be put on the app under
``PLACER`` (see ``novacron.coordinator.api.keys``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from novacron.coordinator.models import HOST_UP, Host, VMSummary, cpu_model_problem, spec_networks

# (VM spec, candidate hosts, VMs already placed) -> chosen host or None if none fits
Placer = Callable[[dict[str, Any], list[Host], Sequence[VMSummary]], Awaitable[Host | None]]


def unreported_mib(hosts: Sequence[Host], vms: Sequence[VMSummary]) -> dict[str, int]:
    """Per host: MiB of VMs placed there that its last report does not list yet
    (one pass over the VMs: fleets have ten times more VMs than hosts)."""
    reports = {h.name: set(h.vms) for h in hosts}
    out: dict[str, int] = {}
    for v in vms:
        listed = reports.get(v.host)
        if listed is not None and v.name not in listed:
            out[v.host] = out.get(v.host, 0) + v.memory_mb
    return out


async def most_free_memory(spec: dict[str, Any], hosts: list[Host],
                           vms: Sequence[VMSummary]) -> Host | None:
    need = int(spec["memory_mb"]) << 20
    pending = unreported_mib(hosts, vms)

    def free(h: Host) -> int:  # its report, less VMs placed there it has not reported yet
        return h.memory_available_bytes - (pending.get(h.name, 0) << 20)

    fits = [h for h in hosts if h.state == HOST_UP and free(h) >= need
            and h.cpus >= int(spec.get("vcpus", 1)) and set(spec_networks(spec)) <= set(h.networks)
            and cpu_model_problem(spec, h) is None]
    if not fits:
        return None
    return max(fits, key=lambda h: (free(h), h.name))
