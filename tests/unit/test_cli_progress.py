"""The migration progress bar shows data, and the exit code says whether the budget held."""

from __future__ import annotations

from novacron.cli.fleet import describe, exit_code, progress_pct


def test_progress_is_data_not_phase() -> None:
    mig = {"phase": "precopy", "round": 12, "metrics": {
        "progress_pct": 41.5, "bytes_acked": 55 << 20, "remaining_bytes": 80 << 20,
        "rate_bytes_s": 2.5e6, "dirty_rate_bytes_s": 1.2e6, "eta_s": 33.6}}
    assert progress_pct(mig) == 41.5  # round 12 of 30 says nothing about the data
    text = describe(mig)
    for words in ("55.0 MiB sent", "80.0 MiB left", "2.4 MiB/s", "dirtying 1.1 MiB/s", "ETA 34s"):
        assert words in text, text
    assert "round" not in text
    assert progress_pct({"phase": "completed", "metrics": {"progress_pct": 99.0}}) == 100.0
    assert progress_pct({"phase": "prepare", "metrics": {}}) == 0.0


def test_exit_codes() -> None:
    assert exit_code({"phase": "completed"}) == 0
    assert exit_code({"phase": "completed", "budget_exceeded": True}) == 3
    assert exit_code({"phase": "failed", "budget_exceeded": True}) == 1
    assert exit_code({"phase": "cancelled"}) == 1
