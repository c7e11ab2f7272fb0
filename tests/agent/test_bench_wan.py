"""``novacron bench wan`` at its smallest: one link, one realistic guest, our engine
and QEMU tcp through the same shaped veth; the table's shape, the guests' own page
check (working set and page-cache files), wire bytes counted on the veth, and
nothing left behind (namespaces, agents, QEMUs)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys

import pytest

from novacron.agent.guest import GuestImage
from novacron.bench import wan


def _args(**over: object) -> argparse.Namespace:
    base = dict(links="1000", memory_mb=224, workload_mb=32, rate_mb=0, vms=1,
                engines="novacron,qemu-tcp", cases="evacuation", json=False)
    return argparse.Namespace(**{**base, **over})


@pytest.mark.parametrize(("over", "words"), [
    ({"links": "fast"}, "--links"), ({"links": "0"}, "1..10000"), ({"engines": "novacron,vmware"}, "engines"),
    ({"cases": "busy"}, "cases"), ({"memory_mb": 128}, "--memory-mb"),
    ({"memory_mb": 208, "workload_mb": 16}, "224"), ({"vms": 0}, "--vms"),
])  # fmt: skip
def test_bench_wan_refuses_bad_options_before_creating_anything(over: dict[str, object], words: str) -> None:
    before = _wan_namespaces()
    with pytest.raises(SystemExit, match=words):
        wan.run(_args(**over))
    assert _wan_namespaces() == before


def _wan_namespaces() -> set[str]:
    """Namespaces named as bench wan names its own (other tests may run beside this one)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith(("nc-wa-", "nc-wb-", "nc-wm-"))}


CHILD = """
import ctypes, sys, threading, time
libc = ctypes.CDLL(None)
spent = {}

def burn(seconds):  # this thread's CPU seconds, however busy the machine (bounded)
    start, deadline = time.thread_time(), time.monotonic() + 20
    while time.thread_time() - start < seconds and time.monotonic() < deadline:
        pass

def vcpu():
    libc.prctl(15, b"CPU 0/TCG", 0, 0, 0)  # PR_SET_NAME, as QEMU names a vCPU thread
    burn(0.8)
    spent["vcpu"] = time.thread_time()

sys.stdin.readline()  # the meter has its baseline
t = threading.Thread(target=vcpu)
t.start()
burn(0.3)
t.join()  # the vCPU thread is gone, as when QEMU quits: its time joins the process total
print(time.thread_time(), spent["vcpu"], flush=True)
sys.stdin.readline()
"""


async def test_cpu_meter_leaves_vcpu_threads_out_even_after_they_exit() -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        await asyncio.sleep(0.3)  # the interpreter has started
        meter = wan.CpuMeter(lambda: [proc.pid])
        meter.start()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        main_s, vcpu_s = (float(x) for x in (await asyncio.to_thread(proc.stdout.readline)).split())
        await asyncio.sleep(0.3)  # a sample after the vCPU thread exited
        measured = await meter.stop()
    finally:
        proc.kill()
        proc.wait()
    assert vcpu_s > 0.7
    # the main thread's work (and the interpreter's own), not the vCPU thread's
    assert main_s - 0.05 <= measured < main_s + 0.15, (measured, main_s, vcpu_s)


def _leftover_qemus() -> list[int]:
    """QEMUs running in a folder of the bench's (its QEMU hosts' or its agents' state dirs):
    QEMU runs with relative paths, so its working directory says whose it is."""
    found = []
    for pid in subprocess.run(["pgrep", "qemu-system"], capture_output=True, text=True).stdout.split():
        with contextlib.suppress(OSError):
            if any(mark in os.readlink(f"/proc/{pid}/cwd") for mark in ("nc-bench-wan-", "nc-wan-a-", "nc-wan-b-")):
                found.append(int(pid))
    return found


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_wan_smallest_run(guest: GuestImage, capsys: pytest.CaptureFixture[str]) -> None:
    report = wan.run(_args())
    rows = {r["engine"]: r for r in report.data["results"]}
    assert set(rows) == {"novacron", "qemu-tcp"}
    heap_pages = 32 * 256
    for r in rows.values():
        assert r["verify"] == "ok" and not r["failed"], r
        # the guest's own check covered its working set and the image's page-cache files
        pages = int(r["verify_detail"].split("(")[1].split()[0])
        assert pages > heap_pages + 40 * 256, pages  # 40+ MiB of file pages
        assert r["vms"] == 1 and r["link_mbit"] == 1000 and r["case"] == "evacuation"
        assert r["total_s"] > 0 and r["downtime_ms"] is not None and r["downtime_ms"] >= 0
        assert r["cpu_s_source"] > 0 and r["cpu_s_destination"] > 0, r
        # more than the page-cache files' worth crossed the veth
        assert r["wire_bytes"] > 48e6, r
    # the veth's counters see what our engine says it wrote, plus headers and API calls
    ours = rows["novacron"]
    assert ours["engine_wire_bytes"][0] <= ours["wire_bytes"] < 1.2 * ours["engine_wire_bytes"][0], ours
    table = report.tables[0]
    assert table.columns[:6] == ["link Mbit/s", "case", "engine", "VMs", "guest check", "total s"]
    assert {"downtime ms (guest)", "wire MB", "CPU s source", "CPU s dest", "wire vs qemu-multifd-zstd"
            } <= set(table.columns)
    assert [row[2] for row in table.rows] == ["novacron", "qemu-tcp"]
    assert all(row[4] == "ok" for row in table.rows)
    assert report.data["guest_checks"] == {"rows": 2, "failed": 0}
    assert set(report.data["load_average"]) == {"start", "end"}
    report.print(json_output=True)
    doc = json.loads(capsys.readouterr().out)
    assert doc["bench"] == "wan" and len(doc["results"]) == 2
    # everything it made is gone
    made = report.data["namespaces"]
    assert len(made) == 3 and all(n.startswith(("nc-wa-", "nc-wb-", "nc-wm-")) for n in made)
    assert not _wan_namespaces() & set(made)
    assert _leftover_qemus() == []


def test_report_ratios_to_multifd_and_a_broken_row() -> None:
    def row(engine: str, total: float, down: float, wire: float) -> dict[str, object]:
        return {"engine": engine, "vms": 1, "total_s": total, "wall_s": total, "downtime_ms": down,
                "wire_bytes": wire, "engine_wire_bytes": [None], "cpu_s_source": 1.0, "cpu_s_destination": 0.5,
                "failed": False, "verify": "ok", "verify_detail": "w: ok (10 pages)", "per_vm": [],
                "link_mbit": 100.0, "case": "single", "load_1m": 1.0}

    broken = {**wan._broken_row("qemu-tcp", 1, "RuntimeError: no heartbeat"),
              "link_mbit": 100.0, "case": "single", "load_1m": 1.0}
    ours_row = {**row("novacron", 5.0, 50.0, 40e6), "dedup_hits": 100, "dedup_offered": 200}
    off = {**row("novacron-nodedup", 6.0, 60.0, 80e6), "dedup_hits": 0, "dedup_offered": 0}
    rows = [ours_row, off, broken, row("qemu-multifd-zstd", 10.0, 100.0, 100e6)]
    report = wan._report(_args(), [100.0], rows, [], "1.00 1.00 1.00", "2.00 2.00 2.00", ["x", "y", "z"])
    ours = report.data["results"][0]
    assert (ours["time_vs_ref"], ours["downtime_vs_ref"], ours["wire_vs_ref"]) == (0.5, 0.5, 0.4)
    # the dedup exchange's saving: wire bytes against our engine with it off, same case
    assert ours["wire_vs_nodedup"] == 0.5 and report.data["results"][1]["wire_vs_nodedup"] is None
    assert report.data["results"][2]["wire_vs_ref"] is None
    table = report.tables[0]
    assert table.rows[0][-2:] == ["100 / 200", 0.5] and table.rows[3][-2] == "-"
    assert table.rows[2][4] == "FAILED: RuntimeError: no heartbeat" and table.rows[2][7] is None
    assert report.data["guest_checks"] == {"rows": 4, "failed": 1}
    assert any("load average at start 1.00 1.00 1.00, at end 2.00 2.00 2.00" in n for n in report.notes)
    report.print()  # renders with the gaps
