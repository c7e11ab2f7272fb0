"""Crash-safe JSON records in the agent's state directory.

Intent is written down before the side effect it announces, so an agent
killed at any instant leaves records that say what it was doing:

    <state_dir>/vms/<name>/vm.json       the VM record (novacron.agent.vm.machine):
                                         spec, accel, state, pid and ``pending``
                                         (an operation begun, not yet finished)
    <state_dir>/incoming/<name>/         a VM being received (agent/migration/qemu_port.py)

A migration journal belongs beside them as its own records written with
``write_record`` (e.g. ``<state_dir>/vms/<name>/migration.json``): one file
per thing, each replaced whole, never appended to.

Every record is a JSON object with ``"kind"`` and ``"format"``; a reader
refuses a record of another kind or a newer format instead of guessing.
Writes go to a temp file that is fsynced, renamed over the record, and the
folder fsynced: after a crash the record is the old one or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from novacron.agent.safefs import create_new, read_regular


class RecordError(ValueError):
    """A record is missing, unreadable, or not what the reader expects."""


class NewerRecord(RecordError):
    """A record written by a newer agent: intact, but not for this agent to judge."""


def write_record(path: Path, kind: str, format_: int, doc: dict[str, Any]) -> None:
    """Atomically replace ``path`` with ``doc`` (plus ``kind`` and ``format``)."""
    data = json.dumps({"kind": kind, "format": format_, **doc}, indent=1).encode()
    tmp = path.with_name(f".{path.name}.tmp")
    fd = create_new(tmp, os.O_WRONLY)  # a VM folder is QEMU-writable: no planted symlink
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def read_record(path: Path, kind: str, max_format: int) -> dict[str, Any]:
    """The record at ``path``; RecordError if it is absent, damaged or foreign.
    Records written before ``kind`` existed (no such key) are accepted."""
    try:
        doc = json.loads(read_regular(path))  # neither a planted symlink nor a fifo
    except FileNotFoundError:
        raise RecordError(f"{path}: no record") from None
    except (OSError, ValueError) as exc:
        raise RecordError(f"{path}: unreadable: {exc}") from None
    if not isinstance(doc, dict):
        raise RecordError(f"{path}: not a JSON object")
    if doc.get("kind", kind) != kind:
        raise RecordError(f"{path}: a {doc.get('kind')!r} record, expected {kind!r}")
    fmt = doc.get("format", 1)
    if not isinstance(fmt, int) or fmt > max_format:
        raise NewerRecord(f"{path}: record format {fmt!r} is newer than this agent knows ({max_format})")
    return doc
