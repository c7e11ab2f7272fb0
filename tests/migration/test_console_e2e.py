"""The serial console through a real coordinator and agent, with real guests (TCG).

``novacron vm console NAME`` (a subprocess, stdin a pipe) types ``verify`` to the
guest's workload, reads its answer, then leaves with Ctrl-]. A second session to
the same VM meanwhile is refused (409). A guest that prints 1 MiB keeps at most
about ``serial_log_max_bytes`` of history on the agent (checked every
``serial_log_check_s``), and the console API still reads on across the trim.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from novacron.agent.guest import ensure_guest
from novacron.agent.local import LocalAgent
from novacron.coordinator.client import ApiClientError, CoordinatorClient
from novacron.coordinator.local import LocalCoordinator
from tests.migration.agents import Api

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CAP = 64 * 1024
CHECK_S = 0.2
FLOOD_KB = 1024


async def read_until(stream: asyncio.StreamReader, pattern: str, timeout: float) -> str:
    rx, text = re.compile(pattern), ""
    deadline = time.monotonic() + timeout
    while not rx.search(text):
        left = deadline - time.monotonic()
        assert left > 0, f"{pattern!r} not seen in {timeout}s: {text[-400:]!r}"
        try:
            chunk = await asyncio.wait_for(stream.read(4096), left)
        except TimeoutError:
            continue
        assert chunk, f"stream ended before {pattern!r}: {text[-400:]!r}"
        text += chunk.decode(errors="replace")
    return text


async def kept_history(api: Api, vm: str, *, settled: bool = False) -> tuple[int, str]:
    """(logical offset of the oldest byte kept, all kept text), read as a client would:
    from offset 0 on, following next_offset across serial.log.1 and serial.log."""
    doc = await api.ok("GET", f"/v1/vms/{vm}/console?offset=0")
    start, text, offset = doc["offset"], doc["text"], doc["next_offset"]
    while True:
        more = await api.ok("GET", f"/v1/vms/{vm}/console?offset={offset}")
        if not more["text"]:
            return start, text
        # while the guest floods, a trim between two reads skips what the reader had not read
        assert more["offset"] == offset or not settled, (more["offset"], offset)
        text, offset = text + more["text"], more["next_offset"]


def history_bytes(agent: LocalAgent, vm: str) -> int:
    folder = agent.state_dir / "vms" / vm
    return sum(p.stat().st_size for p in (folder / "serial.log", folder / "serial.log.1") if p.exists())


async def test_console_through_coordinator_and_bounded_history() -> None:
    guest = ensure_guest()
    work = Path(tempfile.mkdtemp(prefix="nc-con-"))
    coord = LocalCoordinator(work / "coord", settings={"heartbeat_interval_s": "1"})
    try:
        await coord.start()
        agent = LocalAgent("con-a", accel="tcg", cluster_secret=secrets.token_urlsafe(32),
                           settings={"coordinator_url": coord.url, "coordinator_token": coord.agent_token,
                                     "serial_log_max_bytes": str(CAP), "serial_log_check_s": str(CHECK_S)})
        async with agent, CoordinatorClient(coord.url, coord.admin_token) as client:
            deadline = time.monotonic() + 60
            while not await client.hosts():
                assert time.monotonic() < deadline, "agent did not register"
                await asyncio.sleep(0.1)
            base = {"vcpus": 1, "memory_mb": 128, "accel": "tcg", "host": "con-a",
                    "kernel": str(guest.kernel), "initrd": str(guest.initrd)}
            await client.create_vm({**base, "name": "chat", "cmdline": guest.workload_cmdline(mem_mb=16, rate_mb=1)})
            await client.create_vm({**base, "name": "flood", "cmdline":
                                    guest.workload_cmdline(mem_mb=16, rate_mb=1) + f" novacron.flood_kb={FLOOD_KB}"})
            api = Api(agent)
            await api.wait_console("chat", r"NOVACRON-HB .* ok=1", timeout=150)

            # -- interactive session through the CLI: a command, its answer, the escape key
            env = {k: v for k, v in os.environ.items() if not k.startswith("NOVACRON")}
            env.update(NOVACRON_SERVER=coord.url, NOVACRON_TOKEN=coord.admin_token, HOME=str(work))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "novacron.cli.main", "vm", "console", "chat", "--history", "0",
                env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
            try:
                banner = await read_until(proc.stderr, r"Escape character is \^\]", 30)
                assert "Ctrl-]" in banner and "to leave" in banner
                # one session per VM: a second one is refused while this one is attached
                with pytest.raises(ApiClientError) as second:
                    await client.console("chat")
                assert second.value.status == 409 and "attached already" in second.value.message
                # typing through the POST console API still works (it shares the session)
                proc.stdin.write(b"verify\n")
                await proc.stdin.drain()
                answer = await read_until(proc.stdout, r"NOVACRON-VERIFY boot=\w+ pages=\d+ bad=0 result=ok", 60)
                print(f"\nconsole answered: {answer.strip().splitlines()[-1]}")
                proc.stdin.write(b"\x1d")  # Ctrl-]
                await proc.stdin.drain()
                code = await asyncio.wait_for(proc.wait(), 30)
                rest = (await proc.stderr.read()).decode()
                assert code == 0 and "Console of chat: left." in rest, (code, rest)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            # the session is gone: a new one may attach
            ws = await client.console("chat")
            await ws.close()
            with pytest.raises(ApiClientError) as gone:
                await client.console("nope")
            assert gone.value.status == 404

            # -- bounded history while a guest prints 1 MiB
            peak = 0
            done_at = None
            end = time.monotonic() + 300
            while time.monotonic() < end:
                peak = max(peak, history_bytes(agent, "flood"))
                if done_at is not None or "NOVACRON-FLOOD-DONE" in (await kept_history(api, "flood"))[1]:
                    done_at = done_at or time.monotonic()
                    if time.monotonic() - done_at > 3 * CHECK_S:
                        break
                await asyncio.sleep(0.05)
            assert done_at is not None, "the flood did not finish"
            final = history_bytes(agent, "flood")
            print(f"serial history: peak {peak} B, after the flood {final} B, cap {CAP} B "
                  f"(check every {CHECK_S} s; {FLOOD_KB} KiB printed)")
            assert final <= CAP
            # reading from 0 starts where the kept history starts, and reads on to the end
            start, text = await kept_history(api, "flood", settled=True)
            assert start > FLOOD_KB * 1024 - CAP, start
            assert "NOVACRON-FLOOD-DONE kb=1024" in text
            await api.wait_console("flood", r"NOVACRON-HB .* ok=1", timeout=60, offset=start + len(text.encode()))
            # a stopped VM has no console to attach to; its history stays readable
            await client.request("POST", "/vms/flood/stop?force=true")
            with pytest.raises(ApiClientError) as stopped:
                await client.console("flood")
            assert stopped.value.status == 409 and "not running" in stopped.value.message, stopped.value
            assert "NOVACRON-FLOOD-DONE" in (await kept_history(api, "flood", settled=True))[1]
    finally:
        coord.stop()
        shutil.rmtree(work, ignore_errors=True)
