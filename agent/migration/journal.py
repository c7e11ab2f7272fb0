"""The migration journal: what each side of a migration had done when its agent stopped.

One record per migration, ``<state_dir>/migrations/<id>.json`` (written with
``novacron.agent.records.write_record``: fsynced, then the folder fsynced),
replaced whole at each step and always *before* the step's irreversible
effect, so a restarted agent knows which side of every decision it was on:

source       ``started`` (pre-copy; the guest may be throttled) -> ``paused``
             (stop-and-copy) -> ``go`` (switchover ordered: the destination may
             run the guest) -> ``committed`` (the destination confirmed; the
             local copy is released next) | ``rolled_back`` (written after the
             guest runs here again)
destination  ``prepared`` (admitted, QEMU paused) -> ``go`` (about to resume)
             -> ``committed`` (runs here; written before telling the source)
             | ``rolled_back`` (written after the half-built VM is destroyed)

``committed`` and ``rolled_back`` are settled; anything else is unsettled and
fences ``resume`` of the VM on that agent (``MigrationManager.fence_reason``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from novacron.agent.migration.protocol import ID_RE, NAME_RE
from novacron.agent.records import RecordError, read_record, write_record

log = logging.getLogger("novacron.agent.migration")

KIND = "migration"
FORMAT = 1
STEPS = {"source": ("started", "paused", "go", "committed", "rolled_back"),
         "destination": ("prepared", "go", "committed", "rolled_back")}
SETTLED = ("committed", "rolled_back")
MAX_SETTLED_KEPT = 200  # settled records kept for the status API; older ones are pruned


@dataclass
class Entry:
    id: str
    vm: str
    role: str  # "source" | "destination"
    step: str
    # the peer's migration data channel ("host", port): where a restarted source asks
    peer_host: str = ""
    peer_port: int = 0
    # the peer's host name (its certificate's identity): the destination a source's
    # data-port TLS must reach again; the source a destination answers a ``query`` of
    peer_name: str = ""
    reason: str = ""  # why it settled the way it did (or why it is still unsettled)
    budget_exceeded: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # [{"step", "time"}]

    @property
    def settled(self) -> bool:
        return self.step in SETTLED

    def public(self) -> dict[str, Any]:
        """What the status API shows (the coordinator reconciles from it)."""
        return {"step": self.step, "settled": self.settled, "reason": self.reason or None,
                "history": self.history[-10:]}


class Journal:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries: dict[str, Entry] = {}

    def _path(self, mid: str) -> Path:
        return self.root / f"{mid}.json"

    def begin(self, entry: Entry) -> Entry:
        """Record a new migration (its first step) durably."""
        if not ID_RE.match(entry.id) or not NAME_RE.match(entry.vm) or entry.step not in STEPS[entry.role]:
            raise ValueError(f"bad journal entry {entry.id!r} ({entry.role} {entry.step})")
        self.entries[entry.id] = entry
        entry.history.append({"step": entry.step, "time": time.time()})
        self._write(entry)
        return entry

    def step(self, mid: str, step: str, reason: str = "", **fields: Any) -> Entry:
        """Move ``mid`` to ``step`` and make that durable before returning."""
        entry = self.entries[mid]
        if step not in STEPS[entry.role]:
            raise ValueError(f"{step!r} is not a {entry.role} step")
        entry.step = step
        if reason:
            entry.reason = reason[:500]
        for key, value in fields.items():
            setattr(entry, key, value)
        entry.history.append({"step": step, "time": time.time()})
        self._write(entry)
        return entry

    def note(self, mid: str, reason: str) -> None:
        """Update the reason of an unsettled entry (e.g. why it is still in doubt)."""
        entry = self.entries[mid]
        if entry.reason != reason[:500]:
            entry.reason = reason[:500]
            self._write(entry)

    def _write(self, entry: Entry) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_record(self._path(entry.id), KIND, FORMAT, asdict(entry))

    def unsettled(self, vm: str) -> Entry | None:
        for entry in self.entries.values():
            if entry.vm == vm and not entry.settled:
                return entry
        return None

    def load(self) -> list[Entry]:
        """Read every record (at agent start); damaged ones are logged and skipped."""
        if not self.root.is_dir():
            return []
        for path in sorted(self.root.glob("*.json")):
            try:
                doc = read_record(path, KIND, FORMAT)
                doc = {k: v for k, v in doc.items() if k not in ("kind", "format")}
                entry = Entry(**doc)
                if entry.role not in STEPS or entry.step not in STEPS[entry.role] or path.stem != entry.id:
                    raise RecordError(f"{path}: not a valid journal entry")
            except (RecordError, TypeError) as exc:
                log.error("unreadable migration journal record", extra={"path": str(path), "error": str(exc)})
                continue
            self.entries[entry.id] = entry
        self.prune()
        return list(self.entries.values())

    def prune(self, keep: int = MAX_SETTLED_KEPT) -> None:
        settled = [e for e in self.entries.values() if e.settled]
        settled.sort(key=lambda e: e.history[-1]["time"] if e.history else 0.0)
        for entry in settled[: max(0, len(settled) - keep)]:
            del self.entries[entry.id]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(entry.id))
