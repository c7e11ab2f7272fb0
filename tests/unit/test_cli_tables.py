"""The CLI's listings at a forced console width, and API field paths named as flags."""

from __future__ import annotations

import io

from rich.console import Console

from novacron.cli.fleet import id_column, list_table, name_flags, policy_line, print_table
from novacron.cli.main import build_parser, flag_names
from novacron.cli.migration import postcopy_line, summary_table


def _render(table: object, width: int) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None)
    print_table(table, console)  # type: ignore[arg-type]
    return out.getvalue().splitlines()


def _vms(names: list[str], hosts: list[str]) -> object:
    table = list_table("VMs")
    id_column(table, "name", names)
    id_column(table, "host", hosts)
    table.add_column("state")
    table.add_column("notes", overflow="fold")
    for name, host in zip(names, hosts, strict=True):
        table.add_row(name, host, "running", "a long free-text note that may wrap " * 2)
    return table


def test_ids_are_whole_at_80_columns_and_the_rest_wraps() -> None:
    names = ["m-0123456789ab", "web-frontend-eu-west-1-canary-0042"]
    hosts = ["kvm-host-rack12-slot07", "b"]
    lines = _render(_vms(names, hosts), 80)
    text = "\n".join(lines)
    for whole in (*names, *hosts):
        assert whole in text, text
    assert "…" not in text and "free-text" in text
    assert all(len(line) <= 80 for line in lines), text  # fits: the note wrapped
    assert len(lines) > 6  # (it did wrap)


def test_ids_wider_than_the_terminal_are_still_whole() -> None:
    names = ["vm-" + "x" * 70]
    hosts = ["host-" + "y" * 30]
    lines = _render(_vms(names, hosts), 80)
    text = "\n".join(lines)
    assert names[0] in text and hosts[0] in text and "…" not in text, text
    assert max(map(len, lines)) > 80  # the terminal wraps the line; the IDs stay copyable


def test_migration_summary_names_policy_and_options_at_80_columns() -> None:
    mig = {"id": "m-0123456789ab", "vm": "web-frontend-eu-west-1-canary-0042", "source": "a",
           "target": "b", "phase": "precopy", "round": 2, "created_at": 0.0, "policy": "bulk",
           "policy_source": "labels", "options": {"bandwidth_mbps": 50.0, "throttle": False}}
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(summary_table(mig))
    text = out.getvalue()
    assert "m-0123456789ab" in text and "web-frontend-eu-west-1-canary-0042" in text
    assert "bulk (selected by the VM's labels)" in text
    assert "bandwidth_mbps=50, throttle=off" in text
    assert policy_line({"options": {}}) == "no policy; options: the rest: agent defaults"


def test_migration_summary_shows_postcopy() -> None:
    pc = {"used": True, "time_to_resume_ms": 131.3, "recoveries": 1, "recover_ms": 110.3,
          "blocktime": {"fault_ms": {"count": 31, "p50": 73.13, "p99": 143.05, "max": 143.05}}}
    mig = {"id": "m-1", "vm": "web", "source": "a", "target": "b", "phase": "postcopy", "created_at": 0.0,
           "options": {"on_no_converge": "postcopy"}, "metrics": {"postcopy": pc}}
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(summary_table(mig))
    assert ("ran at the destination after 131 ms; 31 page faults waited p50 73.1 ms, p99 143.1 ms; "
            "recovered 1x (last in 110 ms)") in out.getvalue(), out.getvalue()
    assert postcopy_line({"used": True}) == "started"


def test_api_field_paths_are_named_as_flags() -> None:
    parser = build_parser()
    args = parser.parse_args(["migrate", "web", "--to", "b"])
    flags = flag_names(parser, args.func)
    assert name_flags("body.options.max_rounds: 0 is less than 1", flags) == \
        "--max-rounds: 0 is less than 1"
    assert name_flags("body.policy: 'A B' does not match", flags) == "--policy: 'A B' does not match"
    args = parser.parse_args(["vm", "create", "x", "--vcpus", "1", "--memory-mb", "64"])
    flags = flag_names(parser, args.func)
    assert name_flags("body.labels.my-tier: 'a b' does not match", flags) == \
        "--label my-tier: 'a b' does not match"
    assert name_flags("body.labels: 'Tier' does not match", flags) == "--label: 'Tier' does not match"
    assert name_flags("body.placement.region: too long", flags) == "--region: too long"
    assert name_flags("body.unknown: x", flags) == "body.unknown: x"  # no flag: the path stays


def test_metrics_show_the_pause_parts_and_what_the_destination_held() -> None:
    from novacron.cli.fleet import metrics_table

    mig = {"id": "m1", "phase": "completed", "round": 3, "metrics": {
        "bytes_wire": 2_000_000, "downtime_parts": {"final_ms": 4.5, "device_ms": 2.0},
        "dest_dedup": {"hits": 120, "have_bytes": 4096, "first_round_reason": "capped link"},
        "disk_dedup": {"clusters_named": 256, "bytes_named": 16 << 20},
        "pipeline": {"batches": 9}, "round_log": [{"seconds": 0.1}]}}
    table = metrics_table(mig)
    assert table is not None
    rows = dict(zip(table.columns[0]._cells, table.columns[1]._cells, strict=True))
    assert rows["downtime_parts.final_ms"] == "4.5 ms" and rows["dest_dedup.hits"] == "120"
    assert rows["disk_dedup.bytes_named"] == "16.0 MiB" and rows["dest_dedup.first_round_reason"] == "capped link"
    assert rows["dest_dedup.have_bytes"] == "4.0 KiB" and rows["bytes_wire"] == "1.9 MiB"
    assert not any(k.startswith(("pipeline", "round_log")) for k in rows)  # those stay in --json
