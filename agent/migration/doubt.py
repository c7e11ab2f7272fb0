"""Settling a switchover whose answer never came back over the channel.

Once the source has ordered ``go``, losing the channel leaves it not knowing
whether the destination resumed the guest. Resuming blindly could run the
guest twice; staying paused forever loses it. So the source asks the
destination agent's HTTP API, for a bounded time, what became of the
migration: committed there -> the source releases its copy; failed there (the
destination destroys its half-built VM before it says so) or the VM absent ->
the source resumes; no definite answer in time -> the source stays paused and
reports the outcome as in doubt (and, journalled, keeps asking: see
``MigrationManager``). A restarted source keeps no grant for the
destination, so it asks over the destination's migration data port instead
(``ChannelOutcomeProbe``: the cluster secret authenticates, a ``query`` stands
in for the grant, the destination answers from its statuses, journal and VM
table).
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any

import aiohttp

from novacron.agent.channel import AuthError, ChannelClosed, ProtocolError, connect
from novacron.agent.migration import protocol
from novacron.httpjson import ResponseTooLarge, read_json

log = logging.getLogger("novacron.agent.migration")

POLL_S = 0.25  # between questions to the destination
REQUEST_TIMEOUT_S = 5.0


class Outcome(Enum):
    COMMITTED = "committed"  # the guest runs at the destination
    ROLLED_BACK = "rolled_back"  # the destination holds no running copy
    PENDING = "pending"  # the destination has not settled yet
    UNREACHABLE = "unreachable"  # no usable answer


OutcomeProbe = Callable[[], Awaitable[Outcome]]


async def settle(probe: OutcomeProbe | None, timeout_s: float, poll_s: float = POLL_S) -> tuple[Outcome, str]:
    """Ask ``probe`` until it gives a definite answer or ``timeout_s`` passes.

    Returns the outcome (COMMITTED, ROLLED_BACK, or the last indefinite one)
    and a short note of what was last seen, for the status and logs."""
    if probe is None:
        return Outcome.UNREACHABLE, "no way to ask the destination"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = Outcome.UNREACHABLE
    while True:
        try:
            last = await asyncio.wait_for(probe(), max(0.1, deadline - loop.time()))
        except (TimeoutError, OSError, aiohttp.ClientError, ResponseTooLarge, AuthError, ChannelClosed,
                ProtocolError):
            last = Outcome.UNREACHABLE
        if last in (Outcome.COMMITTED, Outcome.ROLLED_BACK):
            return last, f"destination reports {last.value}"
        if loop.time() + poll_s > deadline:
            what = "unreachable" if last is Outcome.UNREACHABLE else "still undecided"
            return last, f"destination {what} for {timeout_s:g}s"
        await asyncio.sleep(poll_s)


class HttpOutcomeProbe:
    """Reads the destination agent's ``GET /v1/migrations/{id}`` (and, when the
    destination no longer knows the migration, ``GET /v1/vms/{name}``)."""

    def __init__(self, url: str, token: str, migration_id: str, vm: str, *,
                 scheme: str = "Bearer", ssl: ssl_.SSLContext | None = None,
                 server_name: str | None = None) -> None:
        self.base = url.rstrip("/")
        # "Grant <grant>": the migration's grant, which lets us read just this migration there
        self.headers = {"Authorization": f"{scheme} {token}"}
        self.migration_id = migration_id
        self.vm = vm
        self.ssl = ssl
        self.server_name = server_name  # over https: the destination host's certificate name

    async def _get(self, session: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
        async with session.get(self.base + path, headers=self.headers, ssl=self.ssl or True,
                               server_hostname=self.server_name) as resp:
            return resp.status, await read_json(resp)

    async def __call__(self) -> Outcome:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            status, doc = await self._get(session, f"/v1/migrations/{self.migration_id}")
            if status == 200 and isinstance(doc, dict):
                return _from_migration(doc)
            if status != 404:
                return Outcome.UNREACHABLE  # auth trouble, overload: not an answer
            # Unknown there (e.g. that agent restarted): whatever holds the VM decides.
            status, doc = await self._get(session, f"/v1/vms/{self.vm}")
            if status == 404:
                return Outcome.ROLLED_BACK
            if status == 200 and isinstance(doc, dict):
                return _from_vm(doc)
            return Outcome.UNREACHABLE


class ChannelOutcomeProbe:
    """Asks the destination agent over its migration data port (``query`` ->
    ``outcome``): what a restarted source uses, as it keeps no API token."""

    def __init__(self, host: str, port: int, secret: str, migration_id: str, vm: str, *,
                 ssl: ssl_.SSLContext | None = None, server_name: str | None = None) -> None:
        self.host, self.port, self.secret = host, port, secret
        self.ssl, self.server_name = ssl, server_name  # mutual TLS: the destination's host name
        self.migration_id = migration_id
        self.vm = vm

    async def __call__(self) -> Outcome:
        ch = await connect(self.host, self.port, self.secret, timeout=REQUEST_TIMEOUT_S,
                           ssl=self.ssl, server_name=self.server_name)
        try:
            await ch.send_ctrl({"op": "query", "id": self.migration_id, "vm": self.vm},
                               timeout=REQUEST_TIMEOUT_S)
            rec = await ch.recv(timeout=REQUEST_TIMEOUT_S)
        finally:
            await ch.close()
        answer = rec.ctrl.get("outcome") if rec.op == "outcome" and rec.ctrl is not None else None
        return Outcome(answer) if answer in protocol.OUTCOMES else Outcome.UNREACHABLE


# What the destination's answers mean; anything else (paused, migrating, a phase
# still running) is not final yet: someone there may still resume the guest.
_BY_PHASE = {"completed": Outcome.COMMITTED, "failed": Outcome.ROLLED_BACK,
             "cancelled": Outcome.ROLLED_BACK}
_BY_VM_STATE = {"running": Outcome.COMMITTED, "stopped": Outcome.ROLLED_BACK,
                "crashed": Outcome.ROLLED_BACK}


def outcome_of_phase(phase: str) -> Outcome:
    """What a destination-side migration phase says about where the guest runs."""
    return _BY_PHASE.get(phase, Outcome.PENDING)


def outcome_of_vm_state(state: str | None) -> Outcome:
    """What the destination's VM state says when it no longer knows the migration."""
    return Outcome.ROLLED_BACK if state is None else _BY_VM_STATE.get(state, Outcome.PENDING)


def _from_migration(doc: dict[str, Any]) -> Outcome:
    return outcome_of_phase(str(doc.get("phase")))


def _from_vm(doc: dict[str, Any]) -> Outcome:
    return outcome_of_vm_state(str(doc.get("state")))
