"""Destination-side dedup with real guests: a guest migrates to an agent that
already runs another guest of the same kernel and initrd. Pages the destination
holds are copied there (verified) instead of sent; the migrated guest's own page
check passes and RAM digests match at switchover."""

from __future__ import annotations

import os
import secrets

import pytest

from novacron.agent.local import LocalAgent
from tests.migration.agents import Api
from tests.migration.qemu_helpers import VERIFY, heartbeats

# two guest boots: opt-in, to spare the suite's budget (the default suite's
# test_e2e_agents.py migrates a real guest with the exchange on, without hits)
pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("NOVACRON_DEDUP_E2E"),
                                 reason="two guest boots: set NOVACRON_DEDUP_E2E=1")]


async def test_guest_lands_on_a_host_running_its_image() -> None:
    secret = secrets.token_urlsafe(32)
    async with LocalAgent("a", cluster_secret=secret, accel="tcg") as a, \
            LocalAgent("b", cluster_secret=secret, accel="tcg") as b:
        api_a, api_b = Api(a), Api(b)
        await api_b.create_guest("resident", rate_mb=1)
        await api_a.create_guest("mover", rate_mb=4)
        text, _ = await api_a.console("mover")
        boot = heartbeats(text)[-1][0]
        mig = await api_a.migrate("mover", b, test_digest=True, downtime_ms=300)
        st = await api_a.wait_migration(mig["id"])
        assert st["phase"] == "completed", st
        assert st["digest"]["equal"] is True
        dd = st["metrics"]["dest_dedup"]
        print("dest dedup", dd, "wire bytes", st["metrics"]["bytes_wire"])
        # the same kernel and initrd: thousands of pages are already there
        assert dd["hits"] > 500 and dd["hits"] + dd["needed"] == dd["offered"], dd
        assert dd["repaired"] == dd["needed"]
        incoming = [x for x in (await api_b.ok("GET", "/v1/migrations"))["migrations"]
                    if x["id"] == mig["id"]]
        theirs = incoming[0]["metrics"]["dest_dedup"]
        assert theirs["hits"] == dd["hits"] and theirs["index"]["entries"] > 0, theirs
        host = await api_b.ok("GET", "/v1/host")
        assert host["dedup_index"]["entries"] > 0 and host["dedup_index"]["memory_bytes"] > 0
        # the guest checks its own memory after the move: same boot, no bad page
        _, offset = await api_b.console("mover")
        await api_b.ok("POST", "/v1/vms/mover/console", {"text": "verify\n"})
        v = await api_b.wait_console("mover", VERIFY.pattern, timeout=30, offset=offset)
        assert v.group(1) == boot and v.group(2) == "0" and v.group(3) == "ok"
