"""``novacron bench migrate`` checks the guest after every migration of every
engine: a migration whose destination RAM was really corrupted (through the
bench's destination hook, between QEMU's completion and the resume) is shown as
failed, counted, and kept out of the ratios; the healthy rows pass."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from novacron.agent.guest import GuestImage
from novacron.bench import migrate as bench

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]
PAGE = 4096


def corrupt_random_pages(ram: Path, limit: int = 64) -> int:
    """Flip the first word of up to ``limit`` pages that look like the workload's
    (pseudo-random: almost no zero bytes); the kernel's pages rarely do."""
    data = ram.read_bytes()
    found = [off for off in range(0, len(data), PAGE) if data[off:off + PAGE].count(0) < 48]
    chosen = found[:: max(1, len(found) // limit)][:limit]
    with open(ram, "r+b") as f:
        for off in chosen:
            f.seek(off)
            f.write(bytes(b ^ 0xFF for b in data[off:off + 8]))
    return len(chosen)


def test_bench_migrate_marks_a_broken_migration(guest: GuestImage, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    hits: list[int] = []

    def hook(engine: str, ram: Path) -> None:
        if engine == "qemu-multifd-zstd":
            hits.append(corrupt_random_pages(ram))

    monkeypatch.setattr(bench, "DEST_RAM_HOOK", hook)
    args = argparse.Namespace(memory_mb=128, workload_mb=32, busy_rate=4, cap=0.0,
                              engines="novacron,qemu-tcp,qemu-multifd-zstd", guests="idle")
    report = bench.run(args)
    rows = {r["engine"]: r for r in report.data["results"]}
    multifd_measured = "qemu-multifd-zstd" in rows
    assert hits or not multifd_measured
    for engine in ("novacron", "qemu-tcp"):
        r = rows[engine]
        assert r["verify"] == "ok" and not r["failed"], r
        assert r["total_s"] > 0 and r["engine_total_s"] > 0
        assert r["pause_ms"] is not None and r["engine_downtime_ms"] is not None, r
        # the pause helper's figures ride along on every row
        assert r["memory_mb"] == 128 and r["cpu_s_per_gib"] > 0 and r["load_1m"] >= 0, r
        assert 0 < r["prepare_s"] < r["total_s"] and r["after_prepare_s"] == r["total_s"] - r["prepare_s"], r
    assert rows["novacron"]["stop_scan"] is not None and rows["novacron"]["cpu_s_destination"] is not None
    assert rows["novacron"]["time_vs_qemu_tcp"] is not None
    assert rows["qemu-tcp"]["qemu_reported_downtime_ms"] == rows["qemu-tcp"]["engine_downtime_ms"]
    table = report.tables[0]
    col = table.columns.index("guest check")
    assert {"MiB", "pause ms (guest)", "engine downtime ms", "after prepare s", "CPU s/GiB", "load"
            } <= set(table.columns)
    if multifd_measured:
        broken = rows["qemu-multifd-zstd"]
        assert broken["failed"] and broken["verify"] == "FAILED", broken
        assert "bad pages" in broken["verify_detail"], broken
        assert broken["time_vs_qemu_tcp"] is None and broken["wire_vs_qemu_tcp"] is None
        assert report.data["guest_checks"] == {"rows": 3, "failed": 1}
        assert [row[col].startswith("FAILED") for row in table.rows] == [False, False, True]
        assert any("2 of 3 migrations passed" in n and "1 failed" in n for n in report.notes)
    report.print(json_output=True)
    doc = json.loads(capsys.readouterr().out)
    assert doc["total_includes_destination_preparation"] is True
    assert [r["verify"] for r in doc["results"]][:2] == ["ok", "ok"]
