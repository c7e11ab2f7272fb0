"""Making the coordinator's records match what the agents really run.

The agents are the truth about where a VM runs. The coordinator's records can
fall behind it: a coordinator killed while an agent accepted a migration, an
agent killed during a create, a migration whose source agent restarted and
forgot it. Whenever the coordinator is unsure it asks the agents concerned
and records what they say; it never deletes a VM record because one agent
does not know the VM while another runs it.

- ``Reconciler.migration_outcome``: where a migration's VM runs now (source
  or target), for a migration the source agent can no longer report.
- ``Reconciler.settle_create``: a VM left ``creating`` (the agent's answer was
  lost): kept if its agent has it, dropped if the agent says it does not.
- ``Reconciler.reconcile_vm``: a VM that another host reports in its
  heartbeat: the record follows the host whose agent runs it.
- ``Reconciler.run``: a loop doing the last two for the whole fleet every
  ``reconcile_interval_s`` (cheap: store reads, agent calls only on mismatch),
  run by the one coordinator holding the ``reconcile`` lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from novacron.coordinator.agent_client import AgentClient, AgentError, reported_state
from novacron.coordinator.lease import Lease
from novacron.coordinator.models import VM, Migration
from novacron.coordinator.store import Store

RECONCILE_LEASE = "reconcile"  # the lease a coordinator holds while it reconciles

log = logging.getLogger("novacron.coordinator.reconcile")

LIVE = frozenset({"running", "paused"})
SETTLED = frozenset({"running", "paused", "stopped", "crashed"})
LOOK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Sighting:
    """One agent's answer about one VM."""

    host: str
    state: str | None  # the agent's state for it; None: the agent has no such VM
    error: str | None = None  # the agent (or its record) could not be reached: no answer

    @property
    def answered(self) -> bool:
        return self.error is None


def migration_outcome(src: Sighting, dst: Sighting) -> str | None:
    """``completed``/``failed`` as the agents' VMs show it; None while undecided
    (an agent unreachable, a side still migrating, or both running a copy)."""
    if not (src.answered and dst.answered) or "migrating" in (src.state, dst.state):
        return None
    if dst.state in SETTLED and src.state not in LIVE:
        return "completed"
    if dst.state is None:
        return "failed"  # the VM is on the source (or, if gone there too, lost there)
    return None


class Reconciler:
    def __init__(self, store: Store, agents: AgentClient) -> None:
        self.store, self.agents = store, agents
        self.creating: set[str] = set()  # VM names whose create call is in flight here

    async def look(self, vm: str, host_name: str) -> Sighting:
        host = await self.store.get_host(host_name)
        if host is None:
            return Sighting(host_name, None, "host not registered")
        try:
            doc = await self.agents.call(host.name, host.url, host.token, "GET", f"/v1/vms/{vm}",
                                         timeout_s=LOOK_TIMEOUT_S)
        except AgentError as exc:
            if exc.status == 404:
                return Sighting(host_name, None)
            return Sighting(host_name, None, exc.message)
        return Sighting(host_name, reported_state(doc, "unknown"))

    async def migration_outcome(self, mig: Migration) -> tuple[str | None, str]:
        """The migration's outcome by where its VM runs, and what was seen."""
        src, dst = await asyncio.gather(self.look(mig.vm, mig.source), self.look(mig.vm, mig.target))
        seen = "; ".join(f"{s.host}: {s.error or s.state or 'no such VM'}" for s in (src, dst))
        outcome = migration_outcome(src, dst)
        if outcome is None and src.state in LIVE and dst.state in LIVE:
            log.error("VM runs on both ends of a migration", extra={"vm": mig.vm, "migration": mig.id,
                                                                     "seen": seen})
        return outcome, seen

    async def settle_create(self, vm: VM) -> str:
        """A VM left ``creating``: 'kept' (its agent has it), 'dropped' (it does not)
        or 'unknown' (no answer; the record keeps its reservation)."""
        seen = await self.look(vm.name, vm.host)
        if not seen.answered:
            if await self.store.get_host(vm.host) is None:
                await self.store.delete_vm(vm.name)
                return "dropped"
            return "unknown"
        if seen.state is None:
            await self.store.delete_vm(vm.name)
            log.info("dropped a VM whose create did not happen on its agent",
                     extra={"vm": vm.name, "host": vm.host})
            return "dropped"
        vm.state, vm.updated_at = seen.state, time.time()
        await self.store.put_vm(vm)
        log.info("kept a VM whose create answer was lost", extra={"vm": vm.name, "host": vm.host,
                                                                   "state": vm.state})
        return "kept"

    async def reconcile_vm(self, vm: VM, elsewhere: list[str]) -> VM:
        """Move ``vm``'s record to the host that runs it, when its recorded host
        does not and exactly one of ``elsewhere`` (hosts reporting it) does."""
        others = [h for h in elsewhere if h != vm.host]
        if not others and vm.state != "migrating":
            return vm
        sights = await asyncio.gather(*(self.look(vm.name, h) for h in [vm.host, *others]))
        home, away = sights[0], sights[1:]
        live_away = [s for s in away if s.state in LIVE]
        if home.state in LIVE or not home.answered:
            if live_away and home.answered:
                log.error("VM reported running by more than one host; record left as is",
                          extra={"vm": vm.name, "hosts": [vm.host, *(s.host for s in live_away)]})
            elif live_away:  # it may run at home too: no move on a missing answer
                log.warning("VM runs elsewhere but its recorded host does not answer; record left",
                            extra={"vm": vm.name, "recorded_host": vm.host, "error": home.error,
                                   "hosts": [s.host for s in live_away]})
            elif vm.state == "migrating" and home.state in SETTLED:
                vm.state, vm.updated_at = home.state, time.time()
                await self.store.put_vm(vm)
            return vm
        if len(live_away) == 1:
            there = live_away[0]
            log.warning("VM record follows the host that runs it",
                        extra={"vm": vm.name, "recorded_host": vm.host, "host": there.host,
                               "state": there.state})
            vm.host, vm.state, vm.updated_at = there.host, there.state or vm.state, time.time()
            await self.store.put_vm(vm)
        elif live_away:
            log.error("VM reported running by more than one host; record left as is",
                      extra={"vm": vm.name, "hosts": [s.host for s in live_away]})
        elif vm.state == "migrating" and home.state in SETTLED:
            vm.state, vm.updated_at = home.state, time.time()
            await self.store.put_vm(vm)
        return vm

    async def run_once(self) -> None:
        # the database names the few VMs that need a look (a pass over every host's list
        # and 100,000 records in Python stalled the event loop for seconds)
        where = await self.store.vms_to_reconcile()
        # after the VMs: covers them. A queued migration has not touched its VM yet.
        migrating = {m.vm for m in await self.store.active_migrations() if m.phase != "queued"}
        for name, hosts in where.items():
            if name in migrating or name in self.creating:  # creating: checked live
                continue
            vm = await self.store.get_vm(name)
            if vm is None:  # deleted since
                continue
            if vm.state == "creating":
                await self.settle_create(vm)
            elif vm.state == "migrating" or any(h != vm.host for h in hosts):
                await self.reconcile_vm(vm, hosts)

    async def run(self, interval_s: float, lease: Lease | None = None) -> None:
        """A pass every ``interval_s`` (the service runs the first one at start); with
        several coordinators on one database, only by the holder of ``lease``."""
        while True:
            await asyncio.sleep(interval_s)
            if lease is None or lease.held:
                await self.run_once_logged()

    async def run_once_logged(self) -> None:
        try:
            await self.run_once()
        except Exception:
            log.exception("reconciliation failed")
