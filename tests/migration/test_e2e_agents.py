"""The issue's end to end, through two real agents on loopback: a busy guest
migrates A -> B, then B -> A; its heartbeat carries on without a reboot, its
own checksum check passes, RAM digests match at switchover and the source
QEMU is gone after commit."""

from __future__ import annotations

import os
import secrets

import pytest

from novacron.agent.local import LocalAgent
from novacron.native import residency_unsafe_reason
from tests.migration.agents import Api
from tests.migration.qemu_helpers import VERIFY, heartbeats

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def hop(src: LocalAgent, dst: LocalAgent, name: str, boot: str) -> dict:
    s, d = Api(src), Api(dst)
    vm_before = await s.ok("GET", f"/v1/vms/{name}")
    mig = await s.migrate(name, dst, test_digest=True, downtime_ms=300)
    assert mig["phase"] in ("prepare", "precopy") and mig["vm"] == name
    st = await s.wait_migration(mig["id"])
    assert st["phase"] == "completed", st
    m = st["metrics"]
    assert st["digest"]["equal"] is True and st["digest"]["source"]
    assert m["downtime_ms"] > 0 and m["total_s"] > 0 and m["bytes_wire"] > 0
    # to a destination on this host, uncapped, every batch goes stored (pipeline.py)
    assert m["pages_sent"] > 0 and m["compression_ratio"] > 0.95
    assert m["pipeline"]["batches"] > 0 and m["cpu_s"] > 0
    assert m["pipeline"]["same_host"] is True and m["pipeline"]["packed_batches"] == 0, m["pipeline"]
    # destination-side dedup is on by default: where the destination may hold pages
    # (or the link is capped) they went by digest first (pipeline.first_round_offer),
    # every one answered (copied there or repaired) before switchover, and the
    # guest's own page check below passes
    dd = m["dest_dedup"]
    assert dd["enabled"] and "first_round_reason" in dd, dd
    assert dd["offered"] > 0 or not dd["first_round_offered"], dd
    assert dd["hits"] + dd["needed"] == dd["offered"], dd
    assert dd["repaired"] == dd["needed"] and dd["outstanding_batches"] == 0, dd
    if residency_unsafe_reason(str(src.state_dir)) == "":
        # the pause read only what QEMU maps of the RAM file (since its entries were last
        # released: maybe nothing, if the guest touched nothing since), digests still match
        assert m["stop_scan"]["mode"] in ("resident", "soft-dirty"), m["stop_scan"]
        assert m["stop_scan"]["pages_examined"] < m["pages"] / 4, m["stop_scan"]
        rel = m["stop_scan"]["release"]
        if m["stop_scan"]["mode"] == "resident" and "skipped" not in rel:
            # QEMU's entries of its RAM really went (those it touched since came back)
            assert rel["bytes"] == m["pages"] * 4096, rel
            assert rel["resident_after"] < rel["resident_before"] / 2, rel
    # the source QEMU is gone, the VM lives only at the destination
    assert not os.path.exists(f"/proc/{vm_before['pid']}")
    assert (await src.request("GET", f"/v1/vms/{name}"))[0] == 404
    assert name not in (await s.ok("GET", "/v1/host"))["vms"]
    vm_after = await d.ok("GET", f"/v1/vms/{name}")
    assert vm_after["state"] == "running"
    # the destination saw the same migration complete
    incoming = (await d.ok("GET", "/v1/migrations"))["migrations"]
    assert [x["phase"] for x in incoming if x["id"] == mig["id"]] == ["completed"]
    theirs = next(x for x in incoming if x["id"] == mig["id"])["metrics"]["dest_dedup"]
    assert theirs["needed"] == dd["needed"] and theirs["hits"] == dd["hits"], theirs
    # the index's cost is reported by the agent
    assert (await d.ok("GET", "/v1/host"))["dedup_index"]["memory_bytes"] > 0
    # heartbeat: same boot, uptime carried on, checks still ok
    await d.wait_console(name, r"NOVACRON-HB .* ok=1", timeout=30)
    text, offset = await d.console(name)
    after = heartbeats(text)
    assert after and after[-1][0] == boot and after[-1][3] == 1
    await d.ok("POST", f"/v1/vms/{name}/console", {"text": "verify\n"})
    v = await d.wait_console(name, VERIFY.pattern, timeout=30, offset=offset)
    assert v.group(1) == boot and v.group(2) == "0" and v.group(3) == "ok"
    return st


async def test_busy_guest_a_to_b_and_back() -> None:
    secret = secrets.token_urlsafe(32)
    async with LocalAgent("a", cluster_secret=secret, accel="tcg") as a, \
            LocalAgent("b", cluster_secret=secret, accel="tcg") as b:
        api_a = Api(a)
        await api_a.create_guest("busy", rate_mb=8)
        text, _ = await api_a.console("busy")
        first = heartbeats(text)[-1]
        boot = first[0]
        st1 = await hop(a, b, "busy", boot)
        st2 = await hop(b, a, "busy", boot)
        text, _ = await api_a.console("busy")
        last = heartbeats(text)[-1]
        # no reboot: same boot id, uptime grew across both hops
        assert last[0] == boot and last[2] > first[2]
        for st in (st1, st2):
            print("migration", st["metrics"]["downtime_ms"], "ms downtime,",
                  st["metrics"]["total_s"], "s total,", st["metrics"]["bytes_wire"], "wire bytes")
        assert a.qemu_pids() and not b.qemu_pids()
