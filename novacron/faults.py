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
sends SIGCONT when it has seen what it wanted). Two more actions serve the
fault matrix: ``<point>:qemu`` SIGKILLs the QEMUs of this agent's VMs
(under ``vms/`` of ``NOVACRON_AGENT_STATE_DIR``: a source's guest),
``<point>:qemu-incoming`` those of VMs still being received (``incoming/``: a
destination's, which a delayed action past the commit no longer finds),
``<point>:cut`` resets every TCP connection on this
agent's data port (``NOVACRON_AGENT_DATA_PORT``, with ``ss -K``: a channel
cut). ``@<seconds>`` delays the action from a thread while the process goes
on (``migration.source.paused:kill@0.04``: a random point inside the phase
that starts there). An armed point fires once.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

ENV = "NOVACRON_CRASH_AT"

log = logging.getLogger("novacron.faults")

_armed, _, _rest = os.environ.get(ENV, "").partition(":")
_action, _, _delay = _rest.partition("@")
_fired = False


def crash_point(name: str) -> None:
    """Act (default: SIGKILL this process) here if the environment names ``name``."""
    global _fired
    if not _armed or _armed != name or _fired:
        return
    _fired = True
    action = _action or "kill"
    delay = float(_delay) if _delay else 0.0
    log.warning("crash point reached", extra={"point": name, "action": action, "delay_s": delay})
    _flush()
    if delay > 0:
        threading.Timer(delay, _act, (action,)).start()
    else:
        _act(action)


def _flush() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def _act(action: str) -> None:
    if action in ("qemu", "qemu-incoming"):
        root = Path(os.environ.get("NOVACRON_AGENT_STATE_DIR", "/nonexistent"))
        killed = _kill_qemus(root / ("vms" if action == "qemu" else "incoming"))
        log.warning("crash point killed QEMU", extra={"pids": killed})
    elif action == "cut":
        port = os.environ.get("NOVACRON_AGENT_DATA_PORT", "")
        if port.isdigit():
            subprocess.run(["ss", "-K", "-t", "(", "sport", "=", f":{port}", "or", "dport", "=",
                            f":{port}", ")"], capture_output=True, timeout=10, check=False)
            log.warning("crash point cut the migration channel", extra={"port": int(port)})
    else:
        _flush()
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
    _flush()


def _kill_qemus(root: Path) -> list[int]:
    """SIGKILL the QEMU processes whose working directory is under ``root``
    (every VM's QEMU runs in its own folder there)."""
    killed = []
    root = root.resolve()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if b"qemu" not in (d / "cmdline").read_bytes():
                continue
            if not Path(os.readlink(d / "cwd")).is_relative_to(root):
                continue
            os.kill(int(d.name), signal.SIGKILL)
            killed.append(int(d.name))
        except (OSError, ValueError):
            continue
    return killed
