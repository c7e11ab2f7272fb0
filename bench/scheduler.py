"""``novacron bench scheduler``: placement policies replayed on an Azure-like trace."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from novacron.bench.report import Report
from novacron.coordinator.scheduler.policy import BanditPolicy, PolicyStateError
from novacron.coordinator.scheduler.rebalance import RebalanceOptions
from novacron.coordinator.scheduler.simulate import POLICIES, SimResult, simulate
from novacron.coordinator.scheduler.trace import make_arrivals, make_background, make_hosts

DESCRIPTION = (
    "Replay a synthetic VM trace (Azure 2017 size mix, arrivals, lifetimes) on 1,000 and "
    "10,000 hosts with first-fit, best-fit, spread and NovaCron's multi-objective scheduler "
    "(plus its learned policy); best-fit is the reference for the ratios."
)
REFERENCE = "best-fit"
TRACE_HOURS = 12.0
P99_TARGET_MS = 5.0
BEAT_MARGIN = 0.01


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", type=int, nargs="+", default=[1000, 10000], metavar="N",
                        help="fleet sizes to run (default: 1000 10000)")
    parser.add_argument("--arrivals", type=int, default=0, metavar="K",
                        help="VM arrivals per fleet size (default: 30 per host up to 1,000 hosts, "
                        "10,000 above)")
    parser.add_argument("--seed", type=int, default=2017,
                        help="random seed of the synthetic fleet and arrivals (default: 2017)")
    parser.add_argument("--rebalance-every", type=float, default=0.0, metavar="HOURS",
                        help="also carry out a rebalancing plan at this interval (default: never)")
    parser.add_argument("--rebalance-moves", type=int, default=10, metavar="N",
                        help="migration cap per rebalancing plan (default 10)")
    parser.add_argument("--policy-state", type=Path, metavar="FILE",
                        help="start the learned policy from this JSON state and save it back "
                        "(default: learn from scratch, save nothing)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES),
                        help="policies to compare (default: all; best-fit is always run as the reference)")


def _arrivals_for(hosts: int, asked: int) -> int:
    # Small fleets get enough arrivals to run near full (fragmentation, rejections);
    # large ones a fixed 10,000 so the default run stays around a minute.
    return asked if asked > 0 else (30 * hosts if hosts <= 1000 else 10_000)


def _load_policy(path: Path | None) -> BanditPolicy:
    if path is None:
        return BanditPolicy()
    try:
        policy = BanditPolicy.load(path)
    except PolicyStateError as exc:
        raise SystemExit(f"novacron bench scheduler: {exc}") from None
    policy.pending.clear()  # open decisions belong to a fleet that no longer exists
    return policy


def _row(r: SimResult, ref: SimResult) -> dict[str, Any]:
    return {
        "hosts_peak": r.hosts_peak, "hosts_mean": round(r.hosts_mean, 1), "hosts_end": r.hosts_end,
        "power_ons": r.power_ons,
        "cost_usd": round(r.cost, 2), "mean_util": round(r.mean_util, 4),
        "peak_util": round(r.peak_util, 4), "rejections": r.rejections, "placed": r.placed,
        "mean_region_rtt_ms": round(r.mean_latency_ms, 2),
        "p50_ms": round(r.p(50), 4), "p99_ms": round(r.p(99), 4),
        "p99_cpu_ms": round(r.p_cpu(99), 4),
        "hosts_peak_vs_ref": round(r.hosts_peak / ref.hosts_peak, 4) if ref.hosts_peak else None,
        "hosts_mean_vs_ref": round(r.hosts_mean / ref.hosts_mean, 4) if ref.hosts_mean else None,
        "cost_vs_ref": round(r.cost / ref.cost, 4) if ref.cost else None,
        "migrations": r.migrations, "migrated_gib": round(r.migrated_gib, 1),
        **({"arms": r.policy_arms} if r.policy_arms else {}),
    }


def run(args: argparse.Namespace) -> Report:
    for n in args.hosts:
        if not 10 <= n <= 100_000:
            raise SystemExit("novacron bench scheduler: --hosts must be between 10 and 100000")
    if args.rebalance_every < 0 or not 1 <= args.rebalance_moves <= 10_000:
        raise SystemExit("novacron bench scheduler: --rebalance-every must be >= 0 and "
                         "--rebalance-moves between 1 and 10000")
    if args.arrivals < 0:
        raise SystemExit("novacron bench scheduler: --arrivals must be >= 0")
    policies = [REFERENCE, *[p for p in args.policies if p != REFERENCE]]
    report = Report("scheduler")
    report.data = {"reference": REFERENCE, "trace_hours": TRACE_HOURS, "runs": {}}
    for n in args.hosts:
        rng = np.random.default_rng(args.seed + n)
        hosts = make_hosts(n, rng)
        background = make_background(hosts, rng)
        count = _arrivals_for(n, args.arrivals)
        arrivals = make_arrivals(count, count / TRACE_HOURS, rng)
        t0 = time.perf_counter()
        bandit = _load_policy(args.policy_state)
        results = {p: simulate(hosts, background, arrivals, p, bandit=bandit,
                               rebalance_every_h=args.rebalance_every,
                               rebalance=RebalanceOptions(max_migrations=args.rebalance_moves))
                   for p in policies}
        if args.policy_state is not None:
            bandit.save(args.policy_state)
        elapsed = time.perf_counter() - t0
        ref = results[REFERENCE]
        table = report.table(
            f"{n:,} hosts, {len(background):,} VMs running at start, {count:,} arrivals over "
            f"{TRACE_HOURS:.0f} h ({elapsed:.1f} s)",
            ["policy", "hosts peak", "hosts mean", "x best-fit", "cost $", "x best-fit", "power-ons",
             "util mean", "util peak", "rejected", "region RTT ms", "p50 ms", "p99 ms",
             "p99 CPU ms", "migrations"])
        rows: dict[str, Any] = {}
        for p in policies:
            r = results[p]
            row = rows[p] = _row(r, ref)
            table.add(p, r.hosts_peak, r.hosts_mean, row["hosts_mean_vs_ref"], r.cost,
                      row["cost_vs_ref"], r.power_ons,
                      f"{r.mean_util:.1%}", f"{r.peak_util:.1%}", r.rejections,
                      r.mean_latency_ms, r.p(50), r.p(99), r.p_cpu(99), r.migrations)
        report.data["runs"][str(n)] = {"background_vms": len(background), "arrivals": count,
                                       "policies": rows}
        for name in ("ours", "ours+learned"):
            if name not in results:
                continue
            r = results[name]
            no_more = r.hosts_peak <= ref.hosts_peak and r.hosts_mean <= ref.hosts_mean + 1e-9
            report.notes.append(
                f"{n:,} hosts, {name}: hosts peak {r.hosts_peak} / mean {r.hosts_mean:.1f} vs "
                f"best-fit {ref.hosts_peak} / {ref.hosts_mean:.1f} "
                f"({'no more' if no_more else 'MORE'} than best-fit), cost x{r.cost / ref.cost:.3f}, "
                f"rejections {r.rejections} vs {ref.rejections}, p99 {r.p(99):.2f} ms wall "
                f"({'within' if r.p(99) <= P99_TARGET_MS else 'ABOVE'} the {P99_TARGET_MS:.0f} ms "
                f"target), {r.p_cpu(99):.2f} ms CPU")
        if "ours+learned" in results:
            r = results["ours+learned"]
            # "beats" needs a real margin: >= 1 % cheaper, and no more hosts or rejections
            beats = (r.cost <= (1 - BEAT_MARGIN) * ref.cost and r.hosts_peak <= ref.hosts_peak
                     and r.hosts_mean <= ref.hosts_mean and r.rejections <= ref.rejections)
            verdict = f"{n:,} hosts: the learned policy {'beats' if beats else 'does NOT beat'} best-fit"
            if "ours" in results:
                o = results["ours"]
                verdict += (f"; against ours (fixed default weights) it costs x{r.cost / o.cost:.3f} "
                            f"with region RTT {r.mean_latency_ms:.1f} vs {o.mean_latency_ms:.1f} ms")
            report.notes.append(verdict + ".")
            report.data["runs"][str(n)]["learned_beats_best_fit"] = beats
    return report
