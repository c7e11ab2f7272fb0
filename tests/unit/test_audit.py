"""The audit file itself: append-only, 0600, bounded lines, redacted, rate-limited refusals, queries."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from novacron import audit, logs
from novacron.audit import AuditLog, query_file


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def entry(**kw: Any) -> dict[str, Any]:
    base = {"actor": "admin", "remote": "127.0.0.1", "action": "POST /api/v1/vms", "target": "web",
            "result": "ok", "status": 201}
    return {**base, **kw}


async def test_appends_only_with_mode_0600_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "audit.log"
    log = AuditLog(path)
    log.open()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        await log.record(**entry(target="one"))
        with open(path, "a") as other:  # another appender (e.g. an operator's note)
            other.write('{"note": "by hand"}\n')
        await log.record(**entry(target="two"))
        raw = path.read_text().splitlines()
        assert [json.loads(x).get("target") for x in raw] == ["one", None, "two"]
        path.rename(tmp_path / "sub" / "audit.log.1")  # logrotate's default: rename, then a new file
        await log.record(**entry(target="three"))
        assert [e["target"] for e in lines(path)] == ["three"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(lines(tmp_path / "sub" / "audit.log.1")) == 3  # the rotated file was not touched again
    finally:
        log.close()
    # A file someone left world-readable is tightened when opened; content kept.
    os.chmod(path, 0o644)
    log = AuditLog(path)
    log.open()
    log.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [e["target"] for e in lines(path)] == ["three"]


async def test_time_is_iso_with_zone_and_lines_are_bounded_and_redacted(tmp_path: Path) -> None:
    secret = 'tok-"quoted"\\back-é-' + os.urandom(4).hex()
    logs.register_secret(secret)
    log = AuditLog(tmp_path / "audit.log")
    log.open()
    try:
        await log.record(**entry(target="vm " + secret))
        await log.record(**entry(target="x" * 100_000, action="é" * 50_000))
    finally:
        log.close()
    raw = (tmp_path / "audit.log").read_bytes()
    assert secret.encode() not in raw and json.dumps(secret)[1:-1].encode() not in raw
    first, second = lines(tmp_path / "audit.log")
    assert first["target"] == "vm ***"
    when = datetime.fromisoformat(first["time"])
    assert when.tzinfo is not None and abs((datetime.now(UTC) - when).total_seconds()) < 60
    assert all(len(x) <= audit.MAX_LINE for x in raw.splitlines(keepends=True))
    assert second["target"].startswith("xxx") and second["action"].startswith("ééé")


async def test_a_burst_of_refusals_gives_a_bounded_number_of_lines(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "audit.log"
    log = AuditLog(path, clock=clock)
    log.open()
    try:
        for _ in range(1000):
            await log.refused(**entry(actor="-", remote="10.0.0.9", result="refused", status=401))
        await log.refused(**entry(actor="-", remote="10.0.0.10", result="refused", status=401))
        assert len(lines(path)) == audit.REFUSED_PER_WINDOW + 1  # the other address has its own quota
        clock.now += audit.REFUSED_WINDOW_S + 1
        await log.record(**entry())  # any later line first writes the ended windows' summaries
        got = lines(path)
        summary = [e for e in got if e["action"] == audit.SUPPRESSED_ACTION]
        assert [(e["remote"], e["suppressed"]) for e in summary] == [
            ("10.0.0.9", 1000 - audit.REFUSED_PER_WINDOW)]
        assert len(got) == audit.REFUSED_PER_WINDOW + 3
        await log.refused(**entry(actor="-", remote="10.0.0.9", result="refused", status=401))
        assert lines(path)[-1]["remote"] == "10.0.0.9"  # a new window: recorded again
        for _ in range(audit.REFUSED_PER_WINDOW + 5):
            await log.refused(**entry(actor="-", remote="10.0.0.9", result="refused", status=401))
        log.flush_all()  # shutdown writes what is pending
        assert lines(path)[-1]["suppressed"] == 6
    finally:
        log.close()


async def test_many_addresses_share_one_bucket_beyond_the_table_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "MAX_TRACKED_ADDRESSES", 8)
    log = AuditLog(tmp_path / "audit.log", clock=Clock())
    log.open()
    try:
        for i in range(500):
            await log.refused(**entry(remote=f"10.1.{i // 256}.{i % 256}", result="refused", status=401))
        log.flush_all()
    finally:
        log.close()
    got = lines(tmp_path / "audit.log")
    # 8 tracked addresses take one line each, the shared bucket its quota, then one summary
    assert len(got) == 8 + audit.REFUSED_PER_WINDOW + 1
    assert got[-1]["remote"] == "*" and got[-1]["suppressed"] == 500 - 8 - audit.REFUSED_PER_WINDOW


async def test_query_filters_newest_first_and_reads_only_the_tail(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "audit.log"
    log = AuditLog(path, clock=clock)
    log.open()
    try:
        for i in range(3000):  # several read chunks
            clock.now += 1
            await log.record(**entry(actor="admin" if i % 2 else "agent", target=f"vm{i}",
                                     action="DELETE /api/v1/vms/{name}" if i % 3 == 0 else "POST /api/v1/vms"))
    finally:
        log.close()
    start = datetime.fromtimestamp(1_800_000_000.0, UTC)
    newest = query_file(path, limit=5)
    assert [e["target"] for e in newest] == ["vm2999", "vm2998", "vm2997", "vm2996", "vm2995"]
    assert len(query_file(path)) == 100 and len(query_file(path, limit=5000)) == audit.MAX_QUERY_LIMIT
    got = query_file(path, actor="agent", action="delete", limit=1000)
    assert got and all(e["actor"] == "agent" and e["action"].startswith("DELETE") for e in got)
    assert {int(e["target"][2:]) % 6 for e in got} == {0}
    assert [e["target"] for e in query_file(path, target="vm7")] == ["vm7"]
    window = query_file(path, since=start + timedelta(seconds=11), until=start + timedelta(seconds=13))
    assert [e["target"] for e in window] == ["vm12", "vm11", "vm10"]
    assert query_file(path, result="refused") == []
    # bounded scan: only the last 4 KiB are read, so old entries are out of reach
    tail = query_file(path, limit=1000, max_bytes=4096)
    assert 0 < len(tail) < 40 and tail[0]["target"] == "vm2999"
    assert query_file(tmp_path / "missing.log") == []


def test_parse_query_names_the_bad_parameter() -> None:
    assert audit.parse_query({"limit": "5", "actor": "admin", "since": "2026-11-30T12:00:00Z"}) == {
        "limit": 5, "actor": "admin", "since": datetime(2026, 11, 30, 12, tzinfo=UTC)}
    for query, word in [({"since": "yesterday"}, "since"), ({"limit": "0"}, "limit"),
                        ({"limit": "x"}, "limit"), ({"target": "t" * 300}, "target")]:
        with pytest.raises(ValueError, match=word):
            audit.parse_query(query)


async def test_a_daemon_that_cannot_open_its_audit_file_does_not_start(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    app = web.Application()
    audit.install(app, AuditLog(tmp_path / "adir"))
    server = TestServer(app, host="127.0.0.1")
    with pytest.raises(SystemExit, match=r"cannot open the audit file .*adir: Is a directory"):
        await server.start_server()
    await server.close()
