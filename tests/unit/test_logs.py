"""Structured logs never carry a registered secret."""

from __future__ import annotations

import io
import json
import logging

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
