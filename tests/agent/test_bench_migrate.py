"""``novacron bench migrate`` checks the guest after every migration of every
engine: a migration whose destination RAM was really corrupted (through the
bench's destination hook, between QEMU's completion and the resume) is shown as
failed, counted, and kept out of the ratios; the healthy rows pass. QEMU's own
post-copy row really switches to post-copy (told to after the first pass) and
the guest's page check passes. Every row says whether pre-copy converged, the
policy that ended it and its pause against the budget; a guest that stayed on
the source by its policy is no failure and has no ratio."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from novacron.agent.guest import GuestImage
from novacron.bench import migrate as bench

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


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_migrate_marks_a_broken_migration(guest: GuestImage, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    hits: list[int] = []

    def hook(engine: str, ram: Path) -> None:
        if engine == "qemu-multifd-zstd":
            hits.append(corrupt_random_pages(ram))

    monkeypatch.setattr(bench, "DEST_RAM_HOOK", hook)
    # post-copy from the first pass on: most of RAM really arrives after the resume
    monkeypatch.setattr(bench, "POSTCOPY_AFTER_SYNCS", 1)
    args = argparse.Namespace(memory_mb=128, workload_mb=32, busy_rate="4", cap=0.0,
                              engines="novacron,qemu-tcp,qemu-multifd-zstd,qemu-postcopy", guests="idle")
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
        # total ends when the guest runs at the destination; stopping the source's copy comes after
        assert r["total_s"] < r["total_released_s"] and r["released_vs_qemu_tcp"] is not None, r
    assert rows["novacron"]["stop_scan"] is not None and rows["novacron"]["cpu_s_destination"] is not None
    assert rows["novacron"]["time_vs_qemu_tcp"] is not None
    assert rows["qemu-tcp"]["qemu_reported_downtime_ms"] == rows["qemu-tcp"]["engine_downtime_ms"]
    for engine in ("novacron", "qemu-tcp"):  # an idle guest converges in pre-copy
        r = rows[engine]
        assert r["converged"] is True and r["policy"] == "pre-copy" and r["migrated"], r
        assert r["pause_vs_budget"].endswith(("within", "OVER")) and "/300 ms" in r["pause_vs_budget"], r
    post = rows["qemu-postcopy"]
    assert post["policy"] == "postcopy" and post["converged"] is False and post["migrated"], post
    assert post["verify"] == "ok" and not post["failed"], post
    # it ran at the destination before the last of its RAM had arrived
    assert 0 < post["total_s"] <= post["complete_s"], post
    table = report.tables[0]
    col = table.columns.index("guest check")
    assert {"MiB", "pause ms (guest)", "engine downtime ms", "after prepare s", "CPU s/GiB", "load"
            } <= set(table.columns)
    if multifd_measured:
        broken = rows["qemu-multifd-zstd"]
        assert broken["failed"] and broken["verify"] == "FAILED", broken
        assert "bad pages" in broken["verify_detail"], broken
        assert broken["time_vs_qemu_tcp"] is None and broken["wire_vs_qemu_tcp"] is None
        assert report.data["guest_checks"] == {"rows": 4, "failed": 1}
        assert [row[col].startswith("FAILED") for row in table.rows] == [False, False, True, False]
        assert any("3 of 4 migrations passed" in n and "1 failed" in n for n in report.notes)
    report.print(json_output=True)
    doc = json.loads(capsys.readouterr().out)
    assert doc["total_includes_destination_preparation"] is True
    assert doc["total_ends"] == "the guest runs at the destination"
    assert [r["verify"] for r in doc["results"]][:2] == ["ok", "ok"]


def _row(engine: str, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "memory_mb": 256, "guest": "busy", "busy_rate_mb": 64, "cap_mbps": 50.0, "engine": engine,
        "total_s": 4.0, "prepare_s": 0.5, "pause_ms": 120.0, "engine_downtime_ms": 110.0,
        "wire_bytes": 200_000_000, "rounds": 5, "cpu_s_per_gib": 3.0, "load_1m": 1.0,
        "failed": False, "verify": "ok", "verify_detail": "ok", "migrated": True,
        "converged": True, "policy": "pre-copy", "dirty_mb_s": 41.5, "budget_ms": 300.0,
    }
    row.update(kw)
    return row


def test_rows_say_converged_policy_and_pause_against_the_budget() -> None:
    """The report's reading of rows (no guests): ratios only between migrations that
    happened and passed; a row that stayed on the source by its policy is no failure."""
    args = argparse.Namespace(workload_mb=96, busy_rate="64", busy_rates=[64], cap=50.0, policy="abort")
    results = [
        _row("novacron", converged=False, policy="abort", migrated=False, total_s=9.0),
        _row("qemu-tcp", total_s=2.0),
        _row("qemu-autoconverge", policy="pre-copy, throttle 60%", pause_ms=420.0, total_s=3.0),
        _row("qemu-postcopy", converged=False, policy="postcopy", total_s=1.0),
        _row("qemu-tcp", cap_mbps=0.0, converged=False, policy="cancel", migrated=False),
        _row("novacron", cap_mbps=0.0, total_s=5.0),
    ]
    report = bench._report(args, [256], results, [])
    aborted, tcp, auto, post, cancelled, uncapped = report.data["results"]
    assert aborted["time_vs_qemu_tcp"] is None and aborted["pause_vs_budget"] == "none: stayed on the source"
    assert not aborted["failed"] and report.data["guest_checks"] == {"rows": 6, "failed": 0}
    assert tcp["time_vs_qemu_tcp"] == 1.0 and tcp["pause_vs_budget"] == "120/300 ms within"
    assert auto["pause_vs_budget"] == "420/300 ms OVER" and auto["time_vs_qemu_tcp"] == 1.5
    assert post["time_vs_qemu_tcp"] == 0.5
    # the uncapped QEMU reference was cancelled: nothing to compare the uncapped row with
    assert cancelled["time_vs_qemu_tcp"] is None and uncapped["time_vs_qemu_tcp"] is None
    table = report.tables[0]
    conv, pol = table.columns.index("converged"), table.columns.index("policy")
    assert [(r[conv], r[pol]) for r in table.rows] == [
        ("no", "abort"), ("yes", "pre-copy"), ("yes", "pre-copy, throttle 60%"), ("no", "postcopy"),
        ("no", "cancel"), ("yes", "pre-copy")]
    assert "64 asked, 41.5" in table.rows[0][table.columns.index("dirtied MB/s")]


def test_repeated_runs_are_reported_as_medians_with_every_run_kept() -> None:
    """``--repeat``: one row per cell and engine, medians of the runs that moved the
    guest, ratios of medians, a cell whose runs ended differently says so (no guests)."""
    args = argparse.Namespace(workload_mb=96, busy_rate="64", busy_rates=[64], cap=50.0, policy="abort", repeat=3)
    results = [
        _row("novacron", run=1, total_s=3.0, pause_ms=10.0),
        _row("qemu-tcp", run=1, total_s=2.0, pause_ms=30.0),
        _row("novacron", run=2, total_s=1.0, pause_ms=50.0),
        _row("qemu-tcp", run=2, total_s=4.0, pause_ms=20.0),
        _row("novacron", run=3, converged=False, policy="abort", migrated=False, total_s=9.0, pause_ms=None),
        _row("qemu-tcp", run=3, total_s=3.0, pause_ms=10.0),
    ]
    report = bench._report(args, [256], results, [])
    ours, tcp = report.data["results"]
    assert (ours["runs"], ours["total_s"], ours["pause_ms"]) == (3, 2.0, 30.0)  # of the two that moved
    assert ours["runs_pause_ms"] == [10.0, 50.0, None] and ours["runs_total_s"] == [3.0, 1.0, None]
    assert ours["policy"] == "pre-copy ×2; abort ×1" and not ours["migrated"] and ours["converged"] is False
    assert (ours["runs_moved"], ours["runs_in_median"]) == (2, 2) and "run" not in ours
    assert ours["pause_vs_budget"] == "30/300 ms within; 1 of 3 runs stayed on the source"
    assert ours["after_prepare_s"] == 1.5  # the median of the runs' own (2.5, 0.5)
    assert (tcp["total_s"], tcp["pause_ms"]) == (3.0, 20.0)
    assert ours["time_vs_qemu_tcp"] is None  # not every run moved the guest: no ratio
    assert tcp["time_vs_qemu_tcp"] == 1.0
    assert len(report.data["runs"]) == 6 and report.data["guest_checks"] == {"rows": 6, "failed": 0}
    assert "medians of 3 runs" in report.tables[0].title


@pytest.mark.parametrize(("field", "value", "words"), [
    ("repeat", 0, "--repeat must be 1..20"),
    ("busy_rate", "16,x", "--busy-rate takes comma-separated integers"),
    ("busy_rate", "0", "each --busy-rate must be 1..10000"),
    ("policy", "pray", "--policy must be one of"),
    ("engines", "qemu-rdma", "unknown engine"),
    ("qemu_timeout", 0.0, "--qemu-timeout must be"),
])
def test_bad_arguments_are_refused_before_any_guest_starts(field: str, value: object, words: str) -> None:
    args = argparse.Namespace(memory_mb="256", workload_mb=96, busy_rate="16", cap=50.0,
                              engines="novacron", guests="idle,busy", policy="abort", qemu_timeout=60.0)
    setattr(args, field, value)
    with pytest.raises(SystemExit, match=words):
        bench.run(args)


@pytest.mark.parametrize("where", [{"disk_gb": 1.0}, {"hypervisor": "libvirt"}])
def test_repeat_is_refused_where_it_does_not_apply(where: dict[str, object]) -> None:
    args = argparse.Namespace(memory_mb="256", workload_mb=96, busy_rate="16", cap=50.0, engines="novacron",
                              guests="idle", policy="abort", qemu_timeout=60.0, repeat=2, **where)
    with pytest.raises(SystemExit, match="--repeat applies to the QEMU RAM matrix only"):
        bench.run(args)


def test_libvirt_rows_read_like_the_others() -> None:
    """``--hypervisor libvirt``: rows of both engines, built from their final status,
    go through the same report (no guests)."""
    from novacron.bench import _migrate_libvirt as lv

    args = argparse.Namespace(workload_mb=96, busy_rate="16", busy_rates=[16], cap=50.0, policy="abort")
    done = {"phase": "completed", "round": 3,
            "metrics": {"total_s": 5.0, "downtime_ms": 180.0, "bytes_wire": 90_000_000,
                        "phase_seconds": {"prepare": 0.4}, "native": {"engine": "libvirt"}}}
    ours = {"phase": "completed", "round": 4,
            "metrics": {"total_s": 3.0, "downtime_ms": 60.0, "bytes_wire": 70_000_000, "converged": True,
                        "phase_seconds": {"prepare": 0.6}}}
    rows = [lv._row("libvirt", 50.0, 6.0, done, 195.0, 1.0), lv._row("novacron", 50.0, 4.0, ours, 70.0, None)]
    for r in rows:
        r.update(memory_mb=256, guest="idle", busy_rate_mb=0, load_1m=1.0, failed=False, verify="ok",
                 verify_detail="ok")
    report = bench._report(args, [256], rows, [])
    table = report.tables[0]
    pause, budget = table.columns.index("pause ms (guest)"), table.columns.index("pause vs budget")
    assert [(r[pause], r[budget]) for r in table.rows] == [(195.0, "195/300 ms within"), (70.0, "70/300 ms within")]
    conv, pol = table.columns.index("converged"), table.columns.index("policy")
    assert [(r[conv], r[pol]) for r in table.rows] == [("?", "libvirt pre-copy, auto-converge"), ("yes", "pre-copy")]


def test_libvirt_row_names_qemus_tcg_dirty_tracking_bug() -> None:
    """A libvirt-engine row that migrated but whose guest failed its check, on a QEMU the
    agent flagged (TCG, < 9.0), names QEMU's dirty-tracking bug; nothing else is relabelled."""
    from novacron.bench import _migrate_libvirt as lv

    flag = {"tcg_lost_writes": lv.TCG_LOST_WRITES}

    def row(engine: str, failed: bool, migrated: bool = True, native: object = flag) -> dict[str, object]:
        return {"engine": engine, "failed": failed, "migrated": migrated, "verify_detail": "no heartbeat",
                "native": native}

    hit = row("libvirt", True)
    lv._explain(hit)
    assert "known QEMU bug" in str(hit["verify_detail"]) and "9.0" in str(hit["verify_detail"])
    assert hit["known_issue"] == "qemu-tcg-dirty-bitmap"
    for r in (row("novacron", True), row("libvirt", False), row("libvirt", True, migrated=False),
              row("libvirt", True, native={"engine": "libvirt"}), row("libvirt", True, native=None)):
        lv._explain(r)
        assert r["verify_detail"] == "no heartbeat" and "known_issue" not in r
