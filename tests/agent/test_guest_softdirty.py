"""The engine's soft-dirty reader (native/nc_pagemap.h) on a kernel that has
soft-dirty: the test guest's Debian kernel (CONFIG_MEM_SOFT_DIRTY), booted
under TCG, runs softdirty_check.c, which reads a second process's page tables
for a shared memfd mapping with that reader."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from novacron.agent.guest import GuestImage
from novacron.agent.local import LocalAgent

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


async def test_soft_dirty_reader_inside_the_guest(guest: GuestImage) -> None:
    agent = LocalAgent("softdirty", accel="tcg")
    try:
        await agent.start()
        spec = {"name": "sd", "vcpus": 1, "memory_mb": 128, "kernel": str(guest.kernel),
                "initrd": str(guest.initrd),
                "cmdline": guest.workload_cmdline(mem_mb=8, rate_mb=0) + " novacron.softdirty_check=1"}
        status, vm = await agent.request("POST", "/v1/vms", spec)
        assert status == 201, vm
        deadline, line = time.monotonic() + 180, None
        while time.monotonic() < deadline and line is None:
            _, doc = await agent.request("GET", "/v1/vms/sd/console")
            found = re.search(r"NOVACRON-SOFTDIRTY [^\r\n]*", doc.get("text", ""))
            line = found.group(0) if found else None
            if line is None:
                await asyncio.sleep(0.5)
    finally:
        await agent.stop()
    assert line is not None, "the guest never ran the soft-dirty check"
    print(line)
    # only the three pages written after the clear are soft-dirty, though all 64 are mapped
    assert line.startswith("NOVACRON-SOFTDIRTY ok soft_dirty=3,17,40 resident=64"), line
