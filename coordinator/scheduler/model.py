"""What the scheduler reasons about: hosts, VM requests, operator weights.

Everything that comes from outside (API bodies, config, the fleet store) is
checked here, so the vectorised code behind it can trust its inputs. A bad
value raises :class:`SchedulerInputError` naming the field and the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Priority = Literal["low", "normal", "high"]
Scope = Literal["host", "zone"]
PRIORITIES: tuple[Priority, ...] = ("low", "normal", "high")
SCOPES: tuple[Scope, ...] = ("host", "zone")


class SchedulerInputError(ValueError):
    """A host, VM request or weight set is malformed; nothing was changed."""

    def __init__(self, where: str, problem: str) -> None:
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Host:
    """A hypervisor host as the scheduler sees it.

    Capacity offered to VMs is ``vcpus * cpu_overcommit`` vCPUs and
    ``memory_mib * mem_overcommit`` MiB. ``cost_per_hour`` is paid while the
    host carries at least one VM (an empty host can be powered off).
    """

    id: str
    vcpus: int
    memory_mib: int
    cost_per_hour: float = 1.0
    zone: str = "default"
    cpu_overcommit: float = 1.0
    mem_overcommit: float = 1.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # user region -> RTT
    enabled: bool = True  # False: in maintenance, takes no new VMs
    networks: frozenset[str] | None = None  # fleet networks it has; None: not known, not filtered
    cpu_models: frozenset[str] | None = None  # CPU models it runs; None: not known, not filtered


@dataclass(frozen=True)
class VMRequest:
    """A VM to place.

    ``affinity``: ids of placed VMs that must share this VM's host.
    ``anti_affinity``: ids of placed VMs that must not share its host (or its
    zone, with ``anti_affinity_scope="zone"``). ``max_latency_ms`` turns the
    region latency into a hard limit; without it latency is only an objective.
    """

    id: str
    vcpus: int
    memory_mib: int
    priority: Priority = "normal"
    region: str | None = None
    max_latency_ms: float | None = None
    affinity: tuple[str, ...] = ()
    anti_affinity: tuple[str, ...] = ()
    anti_affinity_scope: Scope = "host"
    networks: tuple[str, ...] = ()  # fleet networks its NICs join: the host must have them all
    cpu_model: str = ""  # the host must run it ("": not filtered)


@dataclass(frozen=True)
class Weights:
    """Operator weights over the three normalised objectives (lower is better).

    Scores: cost / (priciest host's $/h), performance / 2, latency / 200 ms
    (capped at 1). Defaults (cost 0.7, performance 0.2, latency 0.1): powering
    on an empty host costs at least 0.7 x (cheapest / priciest price), which
    outweighs the at most 0.3 that performance and latency together can add
    whenever host prices are within ~2.3x of each other; so a new host is
    opened only when no running host fits. Among running hosts, tight packing
    and headroom (performance) decide, and latency steers VMs toward their
    users' region. Chosen on ``novacron bench scheduler``: fewer hosts and
    lower cost than best-fit with region RTT cut several-fold.
    """

    cost: float = 0.7
    performance: float = 0.2
    latency: float = 0.1

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.cost, self.performance, self.latency)


DEFAULT_WEIGHTS = Weights()

# --- parsing of untrusted documents -------------------------------------------------

_MAX_ID = 128
_MAX_LIST = 256


def _check_keys(doc: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise SchedulerInputError(where, f"unknown field(s): {', '.join(unknown)}")


def _ident(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SchedulerInputError(where, f"expected a non-empty string, got {value!r}")
    if len(value) > _MAX_ID:
        raise SchedulerInputError(where, f"longer than {_MAX_ID} characters")
    return value


def _pos_int(value: Any, where: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SchedulerInputError(where, f"expected an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise SchedulerInputError(where, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    if value > 1 << 40:
        raise SchedulerInputError(where, f"implausibly large: {value}")
    return value


def _number(value: Any, where: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SchedulerInputError(where, f"expected a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise SchedulerInputError(where, f"must be finite, got {value!r}")
    if v < minimum or (strict and v == minimum):
        raise SchedulerInputError(where, f"must be {'>' if strict else '>='} {minimum}, got {value}")
    return v


def _id_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise SchedulerInputError(where, f"expected a list of VM ids, got {value!r}")
    if len(value) > _MAX_LIST:
        raise SchedulerInputError(where, f"at most {_MAX_LIST} entries")
    return tuple(_ident(v, f"{where}[{i}]") for i, v in enumerate(value))


def parse_host(doc: Any, where: str = "host") -> Host:
    if not isinstance(doc, dict):
        raise SchedulerInputError(where, f"expected an object, got {type(doc).__name__}")
    _check_keys(doc, {"id", "vcpus", "memory_mib", "cost_per_hour", "zone", "cpu_overcommit",
                      "mem_overcommit", "latency_ms", "enabled"}, where)
    for key in ("id", "vcpus", "memory_mib"):
        if key not in doc:
            raise SchedulerInputError(where, f"missing required field '{key}'")
    lat_doc = doc.get("latency_ms", {})
    if not isinstance(lat_doc, dict):
        raise SchedulerInputError(f"{where}.latency_ms", "expected an object region -> milliseconds")
    latency = {_ident(k, f"{where}.latency_ms key"): _number(v, f"{where}.latency_ms.{k}")
               for k, v in lat_doc.items()}
    enabled = doc.get("enabled", True)
    if not isinstance(enabled, bool):
        raise SchedulerInputError(f"{where}.enabled", f"expected true or false, got {enabled!r}")
    return Host(
        id=_ident(doc["id"], f"{where}.id"),
        vcpus=_pos_int(doc["vcpus"], f"{where}.vcpus"),
        memory_mib=_pos_int(doc["memory_mib"], f"{where}.memory_mib"),
        cost_per_hour=_number(doc.get("cost_per_hour", 1.0), f"{where}.cost_per_hour"),
        zone=_ident(doc.get("zone", "default"), f"{where}.zone"),
        cpu_overcommit=_overcommit(doc.get("cpu_overcommit", 1.0), f"{where}.cpu_overcommit"),
        mem_overcommit=_overcommit(doc.get("mem_overcommit", 1.0), f"{where}.mem_overcommit"),
        latency_ms=latency,
        enabled=enabled,
    )


def _overcommit(value: Any, where: str) -> float:
    v = _number(value, where, strict=True)
    if v > 64:
        raise SchedulerInputError(where, f"overcommit above 64 is not sensible, got {value}")
    return v


def parse_request(doc: Any, where: str = "vm") -> VMRequest:
    if not isinstance(doc, dict):
        raise SchedulerInputError(where, f"expected an object, got {type(doc).__name__}")
    _check_keys(doc, {"id", "vcpus", "memory_mib", "priority", "region", "max_latency_ms",
                      "affinity", "anti_affinity", "anti_affinity_scope"}, where)
    for key in ("vcpus", "memory_mib"):
        if key not in doc:
            raise SchedulerInputError(where, f"missing required field '{key}'")
    priority = doc.get("priority", "normal")
    if priority not in PRIORITIES:
        raise SchedulerInputError(f"{where}.priority", f"expected one of {', '.join(PRIORITIES)}, got {priority!r}")
    scope = doc.get("anti_affinity_scope", "host")
    if scope not in SCOPES:
        raise SchedulerInputError(f"{where}.anti_affinity_scope", f"expected 'host' or 'zone', got {scope!r}")
    region = doc.get("region")
    max_lat = doc.get("max_latency_ms")
    if max_lat is not None and region is None:
        raise SchedulerInputError(f"{where}.max_latency_ms", "needs 'region' to measure latency to")
    vm_id = _ident(doc.get("id", "(new)"), f"{where}.id")
    affinity = _id_list(doc.get("affinity", []), f"{where}.affinity")
    anti = _id_list(doc.get("anti_affinity", []), f"{where}.anti_affinity")
    clash = set(affinity) & set(anti)
    if clash:
        raise SchedulerInputError(where, f"VM(s) in both affinity and anti_affinity: {', '.join(sorted(clash))}")
    return VMRequest(
        id=vm_id,
        vcpus=_pos_int(doc["vcpus"], f"{where}.vcpus"),
        memory_mib=_pos_int(doc["memory_mib"], f"{where}.memory_mib"),
        priority=priority,
        region=None if region is None else _ident(region, f"{where}.region"),
        max_latency_ms=None if max_lat is None else _number(max_lat, f"{where}.max_latency_ms"),
        affinity=affinity,
        anti_affinity=anti,
        anti_affinity_scope=scope,
    )


def parse_weights(doc: Any, where: str = "weights") -> Weights:
    if doc is None:
        return DEFAULT_WEIGHTS
    if not isinstance(doc, dict):
        raise SchedulerInputError(where, f"expected an object, got {type(doc).__name__}")
    _check_keys(doc, {"cost", "performance", "latency"}, where)
    w = Weights(
        cost=_number(doc.get("cost", DEFAULT_WEIGHTS.cost), f"{where}.cost"),
        performance=_number(doc.get("performance", DEFAULT_WEIGHTS.performance), f"{where}.performance"),
        latency=_number(doc.get("latency", DEFAULT_WEIGHTS.latency), f"{where}.latency"),
    )
    if sum(w.as_tuple()) <= 0:
        raise SchedulerInputError(where, "at least one weight must be > 0")
    return w
