"""The coordinator's records: what the store persists and the API returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# the agent's VM spec decides the default CPU model; the coordinator only compares names
from novacron.agent.vm.spec import DEFAULT_CPU_MODEL, HOST_CPU_MODEL

HOST_UP, HOST_DOWN = "up", "down"
MIGRATION_TERMINAL = frozenset({"completed", "failed", "cancelled"})


@dataclass
class Host:
    name: str
    url: str  # the agent's HTTP API
    token: str  # the agent's API token: stored so the coordinator can drive it, never returned
    cpus: int
    memory_bytes: int
    memory_available_bytes: int
    state: str = HOST_UP
    accel: dict[str, Any] = field(default_factory=dict)
    data_port: int | None = None
    networks: list[str] = field(default_factory=list)  # fleet networks its agent maps to bridges
    cpu_models: list[str] | None = None  # CPU models VMs may use there; None: not reported
    cpu_signature: str = ""  # its CPU (a "host" passthrough VM moves only between equal ones)
    version: str = ""
    vms: list[str] = field(default_factory=list)
    load: float | None = None
    registered_at: float = 0.0
    last_heartbeat: float = 0.0
    # The store's count of changes to what is placed here (see Store.claim_vm); not part
    # of the stored document nor of the API.
    generation: int = field(default=0, compare=False)

    def public(self) -> dict[str, Any]:
        doc = self.record()
        del doc["token"]
        return doc

    def record(self) -> dict[str, Any]:
        """The stored document."""
        doc = dataclasses.asdict(self)
        del doc["generation"]
        return doc


@dataclass
class VM:
    name: str
    host: str
    spec: dict[str, Any]
    state: str = "creating"  # creating|running|paused|stopped|crashed|migrating|failed
    error: str | None = None
    labels: dict[str, str] = field(default_factory=dict)  # select migration policies (and more)
    migration_policy: str | None = None  # its own policy, over any its labels select
    created_at: float = 0.0
    updated_at: float = 0.0

    def public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class VMSummary(NamedTuple):
    """What fleet-wide loops (placement, reconciliation, counts) need of a VM, read without
    decoding whole records: at 100,000 VMs that decoding alone took seconds per pass."""

    name: str
    host: str
    state: str
    vcpus: int
    memory_mb: int


def summary_int(value: Any) -> int:
    """A size read from a stored spec as the store returns it (int, float or text; absent
    or unreadable counts as 0, as ``spec.get(..., 0)`` did)."""
    try:
        return int(float(value)) if value is not None else 0
    except ValueError:
        return 0


@dataclass
class Migration:
    id: str
    vm: str
    source: str
    target: str
    # queued (over a concurrency limit, see migration_queue)|pending|prepare|precopy|stopcopy|
    # commit|completed|failed|cancelled
    phase: str = "pending"
    round: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    policy: str | None = None  # the migration policy applied (coordinator/migration_policies.py)
    policy_source: str | None = None  # why: request, vm, labels or default
    agent_migration_id: str | None = None
    # the pause outlasted the downtime budget (policy 'force', or a slow hand-over):
    # never a plain success; the CLI exits 3 for it
    budget_exceeded: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None
    started_at: float | None = None  # when it left the queue and went to the source agent
    queue_reason: str | None = None  # while queued: the limit it waits for

    @property
    def done(self) -> bool:
        return self.phase in MIGRATION_TERMINAL

    def public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def spec_cpu_model(spec: dict[str, Any]) -> str:
    """The CPU model a VM spec asks for (the agent's default when it names none)."""
    model = spec.get("cpu_model")
    return model if isinstance(model, str) and model else DEFAULT_CPU_MODEL


def cpu_model_problem(spec: dict[str, Any], host: Host, source: Host | None = None) -> str | None:
    """Why ``host`` cannot run this VM's CPU model (None: it can, or it does not say).
    ``source``: the host the VM runs on now; a ``host`` passthrough VM needs the same CPU."""
    model = spec_cpu_model(spec)
    if host.cpu_models is not None and model not in host.cpu_models:
        if model == HOST_CPU_MODEL:
            return f"host {host.name!r} cannot run CPU model 'host': passthrough needs KVM there"
        return (f"host {host.name!r} cannot run CPU model {model!r} "
                f"(it offers {len(host.cpu_models)} models; see cpu_models in GET /api/v1/hosts)")
    if model == HOST_CPU_MODEL and source is not None and source.cpu_signature != host.cpu_signature:
        return (f"VM uses CPU model 'host' (passthrough): host {host.name!r} has another CPU "
                f"({host.cpu_signature or 'unknown'}) than {source.name!r} ({source.cpu_signature or 'unknown'})")
    return None


def spec_networks(spec: dict[str, Any]) -> tuple[str, ...]:
    """The fleet networks a VM spec's NICs join (the agent validates the spec itself)."""
    nics = spec.get("nics")
    if not isinstance(nics, list):
        return ()
    nets = (n.get("net") for n in nics if isinstance(n, dict))
    return tuple(dict.fromkeys(n for n in nets if isinstance(n, str)))
