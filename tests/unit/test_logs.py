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
    monkeypatch.setattr(logs, "_INDEX", logs._FormIndex())
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


@pytest.mark.parametrize("secret", [
    'tok"en-with-"quotes"-0123',
    "back\\slash\\token-0123456",
    "regex.*meta(chars)|[x]+?{2}$^",
    "nön-äscii-tøken-密码-0123",
    "mixed \"'\\\u00e9\t-0123456789",
])
@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secret_with_special_characters_never_reaches_a_line(
        fresh_secrets: None, secret: str, fmt: str) -> None:
    """However the line escapes it (JSON, repr in a traceback), the secret is gone."""
    buf = io.StringIO()
    logs.setup("info", fmt=fmt, stream=buf)
    logs.register_secret(secret, pinned=False)
    log = logging.getLogger("t")
    log.info("token %s and %r", secret, secret, extra={"token": secret, "nested": {"t": [secret]}})
    try:
        raise ValueError(f"bad token {secret!r}")
    except ValueError:
        log.exception("failed")
    out = buf.getvalue()
    assert out.count("***") >= 5, out
    forms = {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
             json.dumps(repr(secret)[1:-1])[1:-1]}
    for form in forms:
        assert form not in out, (form, out)
    if fmt == "json":
        for line in out.splitlines():
            json.loads(line)  # redaction keeps every line valid JSON


def test_registration_cost_does_not_grow_with_the_number_of_secrets(fresh_secrets: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A registration is O(its length): 20,000 known hosts cost what 500 do."""
    import time

    monkeypatch.setattr(logs, "MAX_LEARNT_SECRETS", 100_000)

    def batch(start: int) -> float:
        t0 = time.perf_counter()
        for i in range(start, start + 500):
            logs.register_secret(f"agent-token-{i:07d}-{'z' * 16}", pinned=False)
        return time.perf_counter() - t0

    small = min(batch(k * 500) for k in range(1, 4))
    for k in range(4, 40):
        batch(k * 500)
    large = min(batch(k * 500) for k in range(40, 43))
    assert logs.tracked_secrets() == 43 * 500 - 500
    assert large < 4 * small + 0.01, (small, large)
    assert logs.redact(f"x agent-token-{20000:07d}-{'z' * 16} y agent-token-{600:07d}-{'z' * 16}") == "x *** y ***"


def test_index_add_and_discard_keep_the_others_intact() -> None:
    """Forms that share prefixes or are prefixes of each other, added and dropped in any order."""
    index = logs._FormIndex()
    words = ["abcdef1234", "abcdef12345678", "abcdXYZ000", "abcd", "zzzz-token-1"]
    for w in words:
        index.add(w)
    assert index.redact("a abcdef12345678 b abcdef1234 c abcdXYZ000 d abcd e") == "a *** b *** c *** d *** e"
    index.discard("abcdef1234")
    assert index.redact("abcdef1234 abcdef12345678 abcd") == "***ef1234 *** ***"  # 'abcd' still a secret
    index.discard("abcd")
    assert index.redact("abcdef1234 abcdef12345678 abcdXYZ000") == "abcdef1234 *** ***"
    for w in ("abcdef12345678", "abcdXYZ000", "zzzz-token-1"):
        index.discard(w)
    assert index.redact("abcdef12345678 zzzz-token-1") == "abcdef12345678 zzzz-token-1"
    assert index._root == {}  # nothing left behind


def test_index_memory_stays_small(fresh_secrets: None) -> None:
    """About a string per secret, not a node per character (that was ~6 KB a secret)."""
    import secrets
    import tracemalloc

    tokens = ["agt-" + secrets.token_urlsafe(24) for _ in range(10_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for t in tokens:
            logs.register_secret(t, pinned=False)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert used < 600 * len(tokens), used


def test_time_stamps_are_iso_8601_with_zone() -> None:
    buf = io.StringIO()
    logs.setup("info", fmt="json", stream=buf)
    logging.getLogger("t").info("hello")
    stamp = json.loads(buf.getvalue())["ts"]
    parsed = datetime.fromisoformat(stamp)
    assert parsed.tzinfo is not None and "T" in stamp
    assert abs(parsed.timestamp() - time.time()) < 60
