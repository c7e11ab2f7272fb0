"""``novacron task classify|plan``: offline in process, from a file, and through --server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from novacron.cli.main import main
from tests.coordinator.conftest import make_cfg, start_coordinator, stop_coordinator
from tests.coordinator.test_cli import cli as run_cli


def test_classify_text_prints_label_confidence_and_reasons(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    assert main(["task", "classify", "Fix the typo in the migration guide"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("simple  (confidence ")
    assert "  - " in out and "typo" in out


def test_classify_file_as_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "tasks.jsonl"
    f.write_text('{"text": "Bump lodash to 4.17.21"}\n\n'
                 '{"text": "Build a multi-region active-active database with automatic failover"}\n')
    assert main(["task", "classify", "--file", str(f), "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [d["label"] for d in lines] == ["simple", "very-complex"]
    assert all(d["reasons"] and 0 < d["confidence"] <= 1 for d in lines)


def test_plan_prints_topology_agents_and_duration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["task", "plan", "Integrate Salesforce with our CRM sync service"]) == 0
    out = capsys.readouterr().out
    assert "topology" in out and "agents:" in out and "estimated duration" in out


@pytest.mark.parametrize(("content", "needle"), [
    ("not json\n", ":1: not JSON"),
    ('{"text": "ok"}\n{"txt": "typo"}\n', ":2: expected an object"),
    ('{"text": "   "}\n', "empty task description"),
    ("\n\n", "no tasks"),
])
def test_bad_files_are_refused_before_anything_runs(tmp_path: Path, content: str, needle: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    assert main(["task", "classify", "--file", str(f)]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and captured.out == ""


def test_text_and_file_are_exclusive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["task", "classify"]) == 2
    assert main(["task", "classify", "x", "--file", str(tmp_path / "f")]) == 2
    assert "either TEXT or --file" in capsys.readouterr().err


@pytest.mark.e2e
async def test_server_mode_calls_the_api(tmp_path: Path) -> None:
    coord = await start_coordinator(make_cfg(tmp_path))
    try:
        async def cli(*args: str) -> tuple[int, str, str]:
            return await run_cli(dict(os.environ), "--token", coord.cfg.admin_token,
                                 "task", *args, "--server", coord.url)

        rc, out, err = await cli("classify", "Add SAML SSO for enterprise customers", "--json")
        assert rc == 0, err
        assert json.loads(out)["label"] == "complex"
        rc, out, err = await cli("plan", "Rename the constant MAX_RETRYS to MAX_RETRIES")
        assert rc == 0, err
        assert out.startswith("simple")
        rc, out, err = await cli("classify", "x" * 5000)
        assert rc == 2 and "too long" in err
    finally:
        await stop_coordinator(coord)


@pytest.mark.parametrize(("content", "needle"), [
    (b"\xff\xfe{\"text\": \"x\"}\n", "cannot read"),  # not UTF-8
    (b"[" * 100_000 + b"\n", ":1: not JSON"),  # would blow the recursion limit
    (b'{"text": "' + b"a" * 4001 + b'"}\n', "task 1: task description too long"),
    (b'{"text": "fix typo"}\n{"text": "\\ud800 half a character"}\n', "task 2: not valid Unicode"),
    (b'{"text": ""}\n', "task 1: empty task description"),
])
def test_unusual_files_give_one_clear_line(tmp_path: Path, content: bytes, needle: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "odd.jsonl"
    f.write_bytes(content)
    assert main(["task", "classify", "--file", str(f)]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and captured.out == ""
    assert captured.err.startswith("novacron task classify: ") and captured.err.count("\n") == 1


def test_files_keep_json_line_separators_and_byte_order_marks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "tasks.jsonl"
    # U+2028 may stand raw inside a JSON string; it does not end the line
    f.write_bytes('\ufeff{"text": "fix the typo\u2028in the README"}\r\n'.encode())
    assert main(["task", "classify", "--file", str(f), "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_files_larger_than_one_batch_are_sent_in_batches(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from novacron.coordinator.classifier.limits import MAX_BATCH

    f = tmp_path / "many.jsonl"
    f.write_text("".join(json.dumps({"text": f"fix typo number {i} in the docs"}) + "\n"
                         for i in range(MAX_BATCH + 3)))
    assert main(["task", "classify", "--file", str(f), "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == MAX_BATCH + 3


def test_abstaining_prints_uncertain_and_plans_conservatively(
        capsys: pytest.CaptureFixture[str]) -> None:
    text = "Switch the reporting stack from nightly batches to streaming."
    assert main(["task", "classify", text]) == 0
    out = capsys.readouterr().out
    assert out.startswith("uncertain (best guess ") and "< 0." in out
    assert main(["task", "classify", text, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["abstained"] and doc["label"] is None
    assert main(["task", "plan", text]) == 0
    assert "planned conservatively as " in capsys.readouterr().out
