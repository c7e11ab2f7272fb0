"""``novacron bench migrate --disk-gb``: a guest with a local disk, our engine and QEMU's
own NBD path, each checked by the guest's disk verifier at the destination."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from novacron.agent.guest import GuestImage
from novacron.bench import _migrate_disk as bench
from novacron.bench import migrate


def verdict(text: str, boot: str = "b1") -> tuple[bool, str]:
    sent = False

    async def read(offset: int) -> tuple[str, int]:
        nonlocal sent
        if sent:
            raise AssertionError("read again: the verdict should have been final")
        sent = True
        return text, offset + len(text)

    return asyncio.run(bench.disk_verdict(read, 0, boot))


def test_disk_verdict_needs_two_clean_passes_of_the_same_boot() -> None:
    ok = "NOVACRON-DISK-VERIFY boot=b1 pass=3 written=9 bad=0 result=ok\n"
    assert verdict(ok * 2) == (True, "ok (2 passes, 9 blocks written)")
    bad = "NOVACRON-DISK-VERIFY boot=b1 pass=4 written=9 bad=2 result=FAIL\n"
    assert verdict(ok + bad) == (False, "disk verifier: 2 bad blocks")
    other = "NOVACRON-DISK-VERIFY boot=b2 pass=1 written=9 bad=0 result=ok\n"
    assert not verdict(ok + other)[0] and "rebooted" in verdict(ok + other)[1]
    assert not verdict(ok + "NOVACRON-DISK-ERROR pwrite: EIO\n")[0]


def test_disk_gb_flag_is_parsed_and_checked() -> None:
    parser = argparse.ArgumentParser()
    migrate.add_arguments(parser)
    args = parser.parse_args(["--disk-gb", "0.001"])
    with pytest.raises(SystemExit, match="at least 16 MiB"):
        migrate.run(args)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_migrate_disk_smallest_case(guest: GuestImage) -> None:
    parser = argparse.ArgumentParser()
    migrate.add_arguments(parser)
    # the seed as a cloud image ships: compressed qcow2 (the live path with a plain image is
    # tests/disks/test_disk_migration.py -k by_digest)
    args = parser.parse_args(["--disk-gb", "0.0625", "--disk-blocks", "1024", "--engines", "novacron,qemu-tcp",
                              "--disk-seed", "compressed"])
    report = migrate.run(args)
    rows = {(r["engine"], r["dest_image"]): r for r in report.data["results"]}
    assert set(rows) == {("novacron", "held"), ("novacron", "absent"), ("qemu-nbd", "n/a")}
    (table,) = report.tables
    assert table.columns[:4] == ["engine", "image at destination", "disk check", "total s"]
    assert len(table.rows) == 3 and all(len(row) == len(table.columns) for row in table.rows)
    for key, r in rows.items():
        print(key, {k: r.get(k) for k in ("total_s", "pause_ms", "engine_downtime_ms", "wire_bytes",
                                           "disk_bytes", "disk_named_bytes", "verify_detail")})
        assert r["verify"] == "ok" and not r["failed"], r
        assert r["total_s"] > 0 and r["pause_ms"] is not None and r["engine_downtime_ms"] is not None, r
        assert r["wire_bytes"] >= r["disk_bytes"] > 0, r
    # the whole 64 MiB disk is allocated (text and random data): all of it crosses the wire,
    # unless the destination holds the image it was copied from (the guest rewrote 4 MiB of
    # it): then it names the clusters from its uncompressed copy of the image
    assert report.data["disk_seed"] == "compressed"
    assert rows[("novacron", "absent")]["disk_bytes"] >= 64 << 20
    assert rows[("qemu-nbd", "n/a")]["disk_bytes"] >= 64 << 20
    held = rows[("novacron", "held")]
    assert held["disk_named_bytes"] >= 56 << 20 and held["disk_bytes"] < 16 << 20, held
    assert held["dest_disk_dedup"]["expanded_copies_used"] == 1, held["dest_disk_dedup"]
    assert rows[("novacron", "absent")]["disk_named_bytes"] == 0
    # the disk's part of the wire (RAM, 128 MiB of it, is most of the rest)
    assert held["time_vs_qemu_nbd"] is not None
    assert held["disk_bytes"] < 0.2 * rows[("qemu-nbd", "n/a")]["disk_bytes"], held
