"""Synthetic fleets and VM traces shaped like the published Azure 2017 mix.

Sizes: 1 vCPU 50 %, 2 vCPU 25 %, 4 vCPU 11 %, 8 vCPU 14 %; memory per vCPU
1.75 GiB for 94 %, 7 GiB for 4 %, 0.75 GiB for 2 % (figures from the design
notes). Lifetimes: a mix of short-lived (mean 30 min), day-scale (mean 8 h)
and long-running VMs, as in public cloud traces where most VMs are short but
most core-hours belong to long ones. Everything is drawn from one seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from novacron.coordinator.scheduler.model import Host, Priority, VMRequest

CORES = np.array([1, 2, 4, 8])
CORE_P = np.array([0.50, 0.25, 0.11, 0.14])
MIB_PER_CORE = np.array([1792, 7168, 768])
MIB_P = np.array([0.94, 0.04, 0.02])

# (name, vCPU, MiB, $/h, share of hosts)
HOST_TYPES = [
    ("gp-32", 32, 128 * 1024, 1.30, 0.40),
    ("gp-64", 64, 256 * 1024, 2.40, 0.45),
    ("mem-48", 48, 384 * 1024, 2.20, 0.15),
]
REGIONS = ("us", "eu", "asia")
REGION_P = np.array([0.45, 0.35, 0.20])
ZONES = ("us-1", "us-2", "eu-1", "eu-2", "asia-1", "asia-2")
# Round-trip between regions' user populations, ms (intra-region zones: 2-9 ms).
INTER_REGION_MS = {("us", "eu"): 85.0, ("us", "asia"): 160.0, ("eu", "asia"): 140.0}

LIFETIME_MIX = ((0.55, 0.5), (0.30, 8.0))  # (share, mean hours); the rest outlive the trace
PRIORITY_NAMES: tuple[Priority, ...] = ("low", "normal", "high")
PRIORITY_P = np.array([0.2, 0.7, 0.1])


def _rtt(zone: str, region: str, jitter: float) -> float:
    zr = zone.split("-")[0]
    if zr == region:
        return 2.0 + jitter * 7.0
    key = (zr, region) if (zr, region) in INTER_REGION_MS else (region, zr)
    return INTER_REGION_MS[key] + jitter * 10.0


def make_hosts(n: int, rng: np.random.Generator) -> list[Host]:
    kinds = rng.choice(len(HOST_TYPES), size=n, p=[t[4] for t in HOST_TYPES])
    zones = rng.integers(0, len(ZONES), size=n)
    zone_jitter = {z: rng.random() for z in ZONES}
    hosts = []
    for i in range(n):
        name, cpu, mem, price, _ = HOST_TYPES[int(kinds[i])]
        zone = ZONES[int(zones[i])]
        lat = {r: round(_rtt(zone, r, zone_jitter[zone]), 2) for r in REGIONS}
        hosts.append(Host(f"{name}-{i:05d}", cpu, mem, price, zone, latency_ms=lat))
    return hosts


def draw_sizes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    cores = rng.choice(CORES, size=n, p=CORE_P)
    mib = cores * rng.choice(MIB_PER_CORE, size=n, p=MIB_P)
    return cores.astype(int), mib.astype(int)


def draw_lifetimes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Hours; ``inf`` for VMs that outlive any trace."""
    u = rng.random(n)
    out = np.full(n, np.inf)
    edge = 0.0
    for share, mean in LIFETIME_MIX:
        sel = (u >= edge) & (u < edge + share)
        out[sel] = rng.exponential(mean, size=int(sel.sum()))
        edge += share
    return out


@dataclass
class Arrival:
    at: float  # hours from trace start
    lifetime: float
    request: VMRequest


def make_background(hosts: list[Host], rng: np.random.Generator, busy_share: float = 0.5
                    ) -> list[tuple[VMRequest, int, float]]:
    """(request, host slot, remaining lifetime) for VMs already running at the start:
    ``busy_share`` of hosts, each filled to a random 20-90 % of its CPU."""
    out: list[tuple[VMRequest, int, float]] = []
    busy = np.flatnonzero(rng.random(len(hosts)) < busy_share)
    k = 0
    for slot in busy:
        h = hosts[int(slot)]
        target = rng.uniform(0.2, 0.9)
        cpu = mem = 0
        cores, mib = draw_sizes(64, rng)
        life = draw_lifetimes(64, rng)
        for c, m, lt in zip(cores, mib, life, strict=True):
            if cpu + c > target * h.vcpus or mem + m > h.memory_mib:
                break
            cpu, mem = cpu + int(c), mem + int(m)
            out.append((VMRequest(f"bg-{k}", int(c), int(m)), int(slot), float(lt)))
            k += 1
    return out


def make_arrivals(count: int, rate_per_hour: float, rng: np.random.Generator,
                  anti_affinity_share: float = 0.05) -> list[Arrival]:
    gaps = rng.exponential(1.0 / rate_per_hour, size=count)
    times = np.cumsum(gaps)
    cores, mib = draw_sizes(count, rng)
    life = draw_lifetimes(count, rng)
    regions = rng.choice(len(REGIONS), size=count, p=REGION_P)
    prios = rng.choice(len(PRIORITY_NAMES), size=count, p=PRIORITY_P)
    pair = rng.random(count) < anti_affinity_share
    out = []
    for i in range(count):
        # a replica: keep it off the host of the VM that arrived just before it
        anti = (f"vm-{i - 1}",) if pair[i] and i > 0 else ()
        req = VMRequest(f"vm-{i}", int(cores[i]), int(mib[i]), PRIORITY_NAMES[int(prios[i])],
                        region=REGIONS[int(regions[i])], anti_affinity=anti)
        out.append(Arrival(float(times[i]), float(life[i]), req))
    return out
