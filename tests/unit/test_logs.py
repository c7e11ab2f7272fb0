"""Structured logs never carry a registered secret."""

from __future__ import annotations

import io
import json
import logging
import time
from collections import OrderedDict
from datetime import datetime

import pytest

from novacron import logs


def test_json_lines_and_redaction() -> None:
    buf = io.StringIO()
    logs.setup("info", fmt="json", stream=buf)
    logs.register_secret("s3cr3t-token-value")
    logging.getLogger("t").info("auth with s3cr3t-token-value", extra={"header": "Bearer s3cr3t-token-value"})
    line = buf.getvalue().strip()
    doc = json.loads(line)
    assert doc["msg"] == "auth with ***"
    assert doc["header"] == "Bearer ***"
    assert "s3cr3t" not in line


@pytest.fixture
def fresh_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty secret list for one test; the process's list is restored after."""
    monkeypatch.setattr(logs, "_PINNED", set())
    monkeypatch.setattr(logs, "_LEARNT", OrderedDict())
    monkeypatch.setattr(logs, "_PATTERN", None)
    monkeypatch.setattr(logs, "_PENDING", set())
    monkeypatch.setattr(logs, "MAX_LEARNT_SECRETS", 50)


def test_learnt_secrets_are_bounded_and_config_secrets_kept(fresh_secrets: None) -> None:
    config_token = "config-token-" + "c" * 20
    logs.register_secret(config_token)  # the process's own config: pinned
    for i in range(500):  # agent tokens learnt while serving
        logs.register_secret(f"agent-token-{i:05d}-{'x' * 16}", pinned=False)
    assert logs.tracked_secrets() == 1 + logs.MAX_LEARNT_SECRETS
    newest = f"agent-token-{499:05d}-{'x' * 16}"
    assert logs.redact(f"a {config_token} b {newest} c") == "a *** b *** c"
    # a learnt secret seen again counts as new: it survives the next flood
    logs.register_secret(f"agent-token-{450:05d}-{'x' * 16}", pinned=False)
    for i in range(logs.MAX_LEARNT_SECRETS - 1):
        logs.register_secret(f"later-{i:05d}-{'y' * 16}", pinned=False)
    assert logs.redact(f"agent-token-{450:05d}-{'x' * 16}") == "***"
    assert logs.redact(config_token) == "***"


def test_redaction_matches_overlaps_and_special_characters(fresh_secrets: None) -> None:
    logs.register_secret("abcdef", pinned=True)
    logs.register_secret("abcdefgh", pinned=True)  # one secret the prefix of another
    logs.register_secret("a.b*c(d)|e", pinned=False)  # regex syntax is literal text
    logs.register_secret(b"\x01\x02\xff\xfe")  # bytes are redacted as hex
    logs.register_secret("abc")  # too short to be a secret: ignored
    assert logs.redact("x abcdefgh y abcdefg z") == "x *** y ***g z"
    assert logs.redact("k=a.b*c(d)|e; abxbcxc") == "k=***; abxbcxc"
    assert logs.redact("key 0102fffe!") == "key ***!"
    assert logs.redact("abc") == "abc"
    assert logs.redact("nothing here") == "nothing here"


def test_registering_many_secrets_compiles_rarely_and_redacts_at_once(
        fresh_secrets: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "MAX_LEARNT_SECRETS", 5000)
    compiled = []
    real = logs._compile
    monkeypatch.setattr(logs, "_compile", lambda src: compiled.append(src) or real(src))
    tokens = [f"agent-token-{i:05d}-{'z' * 12}" for i in range(2000)]
    for token in tokens:  # a fleet registering: not one compile per agent
        logs.register_secret(token, pinned=False)
    assert len(compiled) <= 2000 // logs.MAX_PENDING
    # a secret registered a moment ago is redacted in the very next line
    assert logs.redact(f"calling with {tokens[-1]} now") == "calling with *** now"
    assert logs.redact(f"{tokens[0]}/{tokens[1999]}") == "***/***"
    # nested secrets: the newer one contains an older one, and nothing of it leaks
    logs.register_secret("outer-" + tokens[5] + "-tail", pinned=False)
    assert logs.redact("x outer-" + tokens[5] + "-tail y") == "x *** y"


def test_time_stamps_are_iso_8601_with_zone() -> None:
    buf = io.StringIO()
    logs.setup("info", fmt="json", stream=buf)
    logging.getLogger("t").info("hello")
    stamp = json.loads(buf.getvalue())["ts"]
    parsed = datetime.fromisoformat(stamp)
    assert parsed.tzinfo is not None and "T" in stamp
    assert abs(parsed.timestamp() - time.time()) < 60
