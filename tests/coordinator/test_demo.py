"""``novacron demo`` end to end: real coordinator, real agents, real QEMU guest."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.coordinator.conftest import sigint_default

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def demo_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOVACRON")}
    env.update(COLUMNS="160", TMPDIR=str(tmp_path))  # the demo's work dir lands in tmp_path
    return env


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line or environment names ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            with contextlib.suppress(OSError):
                if text.encode() in (proc / part).read_bytes():
                    found.append(int(proc.name))
                    break
    return found


def assert_cleaned_up(out: str) -> None:
    match = re.search(r"work directory: (\S+)", out)
    assert match, out
    workdir = match[1]
    assert not Path(workdir).exists(), f"{workdir} left behind"
    leftover: list[int] = []
    for _ in range(50):  # processes may take a moment to be reaped
        leftover = processes_mentioning(workdir)
        if not leftover:
            break
        time.sleep(0.1)
    assert not leftover, f"processes left running: {leftover}"


@pytest.fixture(autouse=True)
def no_strays(tmp_path: Path) -> Iterator[None]:
    """Whatever a test asserts about clean-up, nothing it started outlives it (a failed
    run once left the demo's coordinator running for hours)."""
    yield
    for pid in processes_mentioning(str(tmp_path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_demo_live_migrates_the_guest_and_cleans_up(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "novacron.cli.main", "demo"],
                            env=demo_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=540)
    finally:
        if proc.returncode is None:
            kill_group(proc)
    assert proc.returncode == 0, out
    assert "demo complete" in out
    assert "(completed)" in out and "downtime_ms" in out
    match = re.search(r"heartbeat seq (\d+) → (\d+)", out)
    assert match and int(match[2]) > int(match[1]), out
    assert "memory check ok" in out
    assert_cleaned_up(out)


def test_demo_ctrl_c_stops_everything(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "novacron.cli.main", "demo"],
                            env=demo_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=sigint_default)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        for line in proc.stdout:  # ends when the demo exits
            lines.append(line)
            if "waiting for the guest's heartbeat" in line:
                break  # QEMU is running now
            assert time.monotonic() < deadline, "".join(lines)
        assert any("waiting for the guest" in ln for ln in lines), "".join(lines)
        # What a terminal's Ctrl-C does: SIGINT to the whole foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.returncode is None:
            kill_group(proc)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert_cleaned_up(out)
