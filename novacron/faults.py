"""Named crash points for fault-injection tests.

A daemon started with ``NOVACRON_CRASH_AT=<point>`` SIGKILLs itself the first
time it reaches ``crash_point("<point>")``: tests hit millisecond windows (an
agent killed between writing a VM's record and spawning its QEMU, a
coordinator killed while an agent accepts a migration) deterministically.
Unset (always, in production) a crash point costs one string comparison.

Points in use (grep ``crash_point(`` for the authoritative list):
agent: ``vm.create.recorded``, ``vm.create.ram_file``, ``vm.create.spawned``
(the same ``vm.start.*`` when a stopped VM starts), ``vm.create.responding``;
coordinator: ``migration.start.recorded``, ``migration.start.accepted``,
``migration.offline.defined`` (the target has defined a stopped VM, the source not forgotten it);
migration engine (agent/migration): ``migration.source.throttled``,
``migration.source.paused``, ``migration.source.go_sent``,
``migration.source.resumed_received``,
``migration.dest.stopcopy``, ``migration.dest.go_received``.

``<point>:stop`` SIGSTOPs the process there instead (a hung peer: the test
sends SIGCONT when it has seen what it wanted).
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "NOVACRON_CRASH_AT"

log = logging.getLogger("novacron.faults")

_armed, _, _action = os.environ.get(ENV, "").partition(":")


def crash_point(name: str) -> None:
    """SIGKILL (or with ``:stop``, SIGSTOP) this process here if the environment names ``name``."""
    if _armed and _armed == name:
        stop = _action == "stop"
        log.warning("crash point reached", extra={"point": name, "action": "stop" if stop else "kill"})
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGSTOP if stop else signal.SIGKILL)
