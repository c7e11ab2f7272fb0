"""Crash points: ``<point>`` kills at once, ``@<seconds>`` acts later from a thread
while the process goes on, an unnamed point does nothing, a point fires once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = """
import sys, time
from novacron.faults import crash_point
crash_point("other.point")
print("before", flush=True)
crash_point("the.point")
print("after", flush=True)
crash_point("the.point")  # fired already: nothing more
time.sleep(float(sys.argv[1]))
print("survived", flush=True)
"""


def run(spec: str, linger: float = 3.0) -> tuple[int, str, float]:
    env = {**os.environ, "NOVACRON_CRASH_AT": spec}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(linger)], env=env, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    return done.returncode, done.stdout, time.monotonic() - t0


def test_immediate_kill() -> None:
    code, out, _ = run("the.point")
    assert code == -signal.SIGKILL and out == "before\n"


def test_delayed_kill_lets_the_process_go_on() -> None:
    code, out, took = run("the.point:kill@0.5")
    assert code == -signal.SIGKILL and out == "before\nafter\n"
    assert took < 3.0  # killed during the linger, not after it


def test_unarmed_and_other_points_do_nothing() -> None:
    code, out, _ = run("", linger=0)
    assert code == 0 and out == "before\nafter\nsurvived\n"
    code, out, _ = run("no.such.point", linger=0)
    assert code == 0 and out == "before\nafter\nsurvived\n"


def test_qemu_action_kills_the_vms_qemus_only(tmp_path: Path) -> None:
    inside, outside = tmp_path / "state" / "vms" / "m", tmp_path / "state" / "incoming" / "m"
    inside.mkdir(parents=True)
    outside.mkdir(parents=True)
    # stand-ins named like QEMU: a VM's, and one being received (``qemu-incoming``'s)
    procs = [subprocess.Popen(["bash", "-c", "exec -a qemu-system-x86_64 sleep 30"], cwd=d)
             for d in (inside, outside)]
    try:
        deadline = time.monotonic() + 10
        while not all(b"qemu" in Path(f"/proc/{p.pid}/cmdline").read_bytes() for p in procs):
            assert time.monotonic() < deadline, "the stand-ins did not start"
            time.sleep(0.01)  # until bash exec'd sleep under its new name
        env = {**os.environ, "NOVACRON_CRASH_AT": "the.point:qemu",
               "NOVACRON_AGENT_STATE_DIR": str(tmp_path / "state")}
        done = subprocess.run([sys.executable, "-c", SCRIPT, "0"], env=env, capture_output=True,
                              text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0 and done.stdout == "before\nafter\nsurvived\n"
        assert procs[0].wait(10) == -signal.SIGKILL
        assert procs[1].poll() is None
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
