"""Offline (cold) migration of a stopped VM's local disks, over the migration channel.

The same pieces as a live migration's disks (``diskrelay.py``), without a guest:
the destination creates the disks empty (an overlay on the same backing image when
the digests match) and exports them over NBD on a unix socket in its incoming
folder (``qemu-storage-daemon``: no VM runs there yet); the source copies each
disk's allocated clusters with ``qemu-img convert -n`` into its local relay socket,
whose bytes travel as ``DATA`` records of the mutually authenticated, encrypted
channel under the coordinator's grant. Zero and unallocated clusters are not sent
(NBD write-zeroes, or skipped); an overlay's backing image never is.

Messages: the source's ``prepare`` (with ``"offline": true``), the destination's
``prepared`` (its export listens), the relay's ``disk_open``/``disk_eof``, the
source's ``disks_done`` (every copy completed), and the destination's ``done``
(the VM is defined there, stopped). Any failure before ``done``: the destination
removes its folder and copies; the source never changes its own VM, which stays
defined (stopped) here. The coordinator then makes the source forget the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from novacron.agent.channel.records import CTRL, DATA, Channel, ChannelClosed, ProtocolError
from novacron.agent.migration import diskdedup, protocol
from novacron.agent.migration.diskrelay import DestDiskRelay, SourceDiskRelay
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.vm.expanded import Expanded

log = logging.getLogger("novacron.agent.migration")

PREPARE_TIMEOUT_S = 120.0  # creating the disks and starting the export at the destination
DEFINE_TIMEOUT_S = 60.0  # the destination flushing its export and defining the VM


class OfflineFailed(Exception):
    pass


class OfflineSource(Protocol):
    """A stopped VM whose local disks an offline migration copies."""

    name: str
    work_dir: Path
    ram_size: int

    def spec(self) -> dict[str, Any]: ...

    async def disk_plan(self) -> list[dict[str, Any]]:
        """As ``MirrorSource.disk_plan``."""
        ...

    async def copy_disk(self, index: int, socket_path: Path) -> None:
        """Write disk ``index``'s allocated data to the NBD export (named as the disk's
        node) reached through ``socket_path``; raise if the copy failed."""
        ...

    async def stay(self) -> None:
        """The copy is over (either way): the VM is an ordinary stopped VM here again."""
        ...


class OfflineDest(Protocol):
    async def export_disks(self) -> str:
        """Export the new (empty) local disks over NBD; returns the unix socket's path."""
        ...

    def disk_template(self, index: int) -> tuple[int, str] | None:
        """As ``MirrorDest.disk_template``."""
        ...

    def disk_expanded(self) -> Expanded | None:
        """As ``MirrorDest.disk_expanded``."""
        ...

    async def stop_disk_export(self) -> None:
        """Stop the export, its data flushed to the files; raise if that failed."""
        ...

    async def adopt(self) -> None:
        """Define the VM here, stopped, with the copied disks."""
        ...

    async def destroy(self) -> None:
        """Remove everything the copy made here (export, folder, disks)."""
        ...


@runtime_checkable
class OfflineFactory(Protocol):
    async def prepare_offline(self, spec: dict[str, Any], migration_id: str,
                              disks: list[dict[str, Any]]) -> OfflineDest:
        """Admit the stopped VM and create its local ``disks`` empty; raises AdmissionError."""
        ...


# ----- source ---------------------------------------------------------------------
async def send_offline(vm: OfflineSource, ch: Channel, status: MigrationStatus, liveness: float,
                       timeout: float, disk_dedup: bool = True) -> None:
    """Copy ``vm``'s local disks to the destination at the other end of ``ch``; the
    status ends completed (the destination defined the VM) or failed."""
    relay: SourceDiskRelay | None = None
    tasks: list[asyncio.Task[Any]] = []
    answers: asyncio.Queue[str] = asyncio.Queue()
    try:
        async with asyncio.timeout(timeout):
            plan = await vm.disk_plan()
            indices = [int(p["index"]) for p in plan]
            await ch.send_ctrl({"op": "prepare", "offline": True, "id": status.id, "vm": vm.name,
                                "spec": vm.spec(), "ram_size": vm.ram_size, "liveness_s": liveness,
                                "disks": plan, "disk_dedup": disk_dedup})
            keys = diskdedup.AnnouncedKeys(indices)
            relay = SourceDiskRelay(ch, status, vm.work_dir, indices, keys=keys.keys)
            tasks.append(asyncio.create_task(protocol.keepalive(ch, liveness)))
            reader = asyncio.create_task(_source_records(ch, relay, keys, liveness, answers))
            tasks.append(reader)
            await _until(reader, _expect(answers, "prepared"), PREPARE_TIMEOUT_S)
            status.set_phase("precopy")
            paths = await relay.listen()
            for i in indices:
                await _until(reader, vm.copy_disk(i, paths[i]), None)
                if relay.error is not None:
                    raise OfflineFailed(f"disk relay failed: {relay.error}")
                log.info("offline disk copied", extra={"migration": status.id, "disk": i,
                                                       "disk_bytes": status.disk_bytes})
            await ch.send_ctrl({"op": "disks_done"})
            status.set_phase("commit")
            await _until(reader, _expect(answers, "done"), DEFINE_TIMEOUT_S)
        status.set_phase("completed")
        log.info("offline migration completed", extra={"migration": status.id, "vm": vm.name,
                                                       "disk_bytes": status.disk_bytes})
    except (OfflineFailed, ProtocolError, ChannelClosed, OSError, TimeoutError) as exc:
        why = f"timed out after {timeout:g}s" if isinstance(exc, TimeoutError) else (
            str(exc) or type(exc).__name__)
        status.fail(f"offline migration failed: {why}")
        log.warning("offline migration failed", extra={"migration": status.id, "reason": status.error})
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        if relay is not None:
            await relay.close()
        await vm.stay()


async def _source_records(ch: Channel, relay: SourceDiskRelay, keys: diskdedup.AnnouncedKeys,
                          liveness: float, answers: asyncio.Queue[str]) -> None:
    """Serve the destination's records; its ``prepared``/``done`` go to ``answers``.
    Ends (raising) when the channel fails or the destination reports an error."""
    while True:
        rec = await ch.recv(timeout=liveness)
        if rec.kind == DATA:
            if rec.frame is None:
                raise ProtocolError("empty disk data record")
            if rec.stream == diskdedup.DISK_KEYS:
                keys.add(bytes(rec.frame))  # before 'prepared'
            else:
                relay.deliver(rec.stream, rec.frame)  # NBD replies to our qemu-img
            continue
        if rec.kind != CTRL or rec.ctrl is None:
            raise ProtocolError("unexpected record from the destination")
        op = rec.op
        if op == "keepalive":
            continue
        if op == "disk_eof":
            relay.peer_eof(protocol.check_stream(rec.ctrl, relay.disks))
        elif op == "error":
            raise OfflineFailed(f"destination: {protocol.reason_of(rec.ctrl)}")
        elif op == "disk_need":
            relay.on_need(rec.ctrl)
        elif op in ("prepared", "done"):
            if op == "prepared":
                keys.settle(rec.ctrl.get("disk_keys"))
            answers.put_nowait(op)
        else:
            raise ProtocolError(f"unexpected {op!r} from the destination")


async def _expect(answers: asyncio.Queue[str], op: str) -> None:
    got = await answers.get()
    if got != op:
        raise ProtocolError(f"expected {op!r} from the destination, got {got!r}")


async def _until(reader: asyncio.Task[None], work: Any, timeout: float | None) -> None:
    """Run ``work`` while the reader serves the channel: the reader failing fails it."""
    job = asyncio.ensure_future(work)
    try:
        async with asyncio.timeout(timeout):
            done, _ = await asyncio.wait({job, reader}, return_when=asyncio.FIRST_COMPLETED)
        if job in done:
            job.result()
            return
        reader.result()  # raises the reader's failure
        raise ChannelClosed("the destination closed the channel")
    finally:
        if not job.done():
            job.cancel()
            with contextlib.suppress(BaseException):
                await job


# ----- destination ----------------------------------------------------------------
async def receive_offline(ch: Channel, factory: OfflineFactory, status: MigrationStatus,
                          spec: dict[str, Any], disks: list[dict[str, Any]], liveness: float,
                          disk_dedup: bool = False) -> None:
    """Create the disks, take the source's copy over the relay, define the VM stopped.
    Any failure removes what was made here and tells the source why."""
    dest: OfflineDest | None = None
    relay: DestDiskRelay | None = None
    indices = [int(d["index"]) for d in disks]
    try:
        dest = await factory.prepare_offline(spec, status.id, disks)
        relay = DestDiskRelay(ch, status, await dest.export_disks(), indices,
                              await diskdedup.announce(ch, status, dest, indices) if disk_dedup else None)
        prepared: dict[str, Any] = {"op": "prepared"}
        if relay.decoders:
            prepared["disk_keys"] = diskdedup.announced(relay.decoders)
        await ch.send_ctrl(prepared)
        status.set_phase("precopy")
        while True:
            rec = await ch.recv(timeout=liveness)
            if rec.kind == DATA:
                if rec.frame is None:
                    raise ProtocolError("empty disk data record")
                await relay.deliver(rec.stream, rec.frame)
            elif rec.kind != CTRL or rec.ctrl is None:
                raise ProtocolError("unexpected record in an offline migration")
            elif rec.op == "keepalive":
                pass
            elif rec.op == "disk_open":
                await relay.open_stream(protocol.check_stream(rec.ctrl, indices))
            elif rec.op == "disk_eof":
                relay.peer_eof(protocol.check_stream(rec.ctrl, indices))
            elif rec.op == "error":
                raise OfflineFailed(f"source: {protocol.reason_of(rec.ctrl)}")
            elif rec.op == "disks_done":
                relay.check_settled()
                break
            else:
                raise ProtocolError(f"unexpected {rec.op!r} in an offline migration")
            if relay.error is not None:
                raise OfflineFailed(f"disk relay failed: {relay.error}")
        status.set_phase("commit")
        await relay.close()
        relay = None
        await dest.stop_disk_export()  # flushed to the files before the VM is defined
        await dest.adopt()
        defined, dest = dest, None
        try:
            await ch.send_ctrl({"op": "done"}, timeout=10)
        except BaseException:
            await defined.destroy()  # the source will keep the VM: so must not we
            raise
        status.set_phase("completed")
        log.info("offline migration received", extra={"migration": status.id, "vm": status.vm,
                                                      "disk_bytes": status.disk_bytes})
    except Exception as exc:
        status.fail(f"offline migration failed: {exc or type(exc).__name__}")
        log.warning("offline migration failed", extra={"migration": status.id, "reason": status.error})
        with contextlib.suppress(Exception):
            await ch.send_ctrl({"op": "error", "reason": status.error}, timeout=2)
    except BaseException:
        status.fail("offline migration cancelled", cancelled=True)
        raise
    finally:
        if relay is not None:
            await relay.close()
        if dest is not None:
            await dest.destroy()
