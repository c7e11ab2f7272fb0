"""Structured logging shared by every NovaCron process.

One JSON object per line (or ``key=value`` text on a terminal), with any
registered secret scrubbed from the message and its fields before output.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections import OrderedDict
from datetime import datetime
from typing import Any

from novacron.config import Invalid

LEVELS = ("debug", "info", "warning", "error", "critical")  # what setup() takes, any case

# The process's own secrets (from its config) are pinned: never evicted. Secrets
# learnt while running (agent tokens, migration targets) are kept newest-first up
# to MAX_LEARNT_SECRETS, so a long-lived coordinator's list stays bounded.
MAX_LEARNT_SECRETS = 1024
_PINNED: set[str] = set()
_LEARNT: OrderedDict[str, None] = OrderedDict()
_PATTERN: re.Pattern[str] | None = None  # every secret in one prefix-tree regex
# Secrets registered since _PATTERN was compiled. Compiling costs O(all secrets), so a
# burst of registrations (agents joining a fleet) must not compile once each: the
# pattern is rebuilt when MAX_PENDING accumulate, or at once when a line to redact
# contains a pending one (checked with plain substring tests).
_PENDING: set[str] = set()
MAX_PENDING = 256
_LOCK = threading.Lock()
_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def register_secret(value: str | bytes | None, *, pinned: bool = True) -> None:
    """Never let ``value`` reach a log line (tokens, cluster secrets, keys).

    A process's own configured secrets are pinned (never forgotten). Secrets
    learnt while running (agents' tokens, migration targets' tokens) pass
    ``pinned=False``: only the newest MAX_LEARNT_SECRETS of those are kept.
    """
    if not value:
        return
    text = value.hex() if isinstance(value, bytes) else value
    if len(text) < 4:
        return
    with _LOCK:
        if text in _PINNED:
            return
        if pinned:
            _LEARNT.pop(text, None)
            _PINNED.add(text)
        elif text in _LEARNT:
            _LEARNT.move_to_end(text)  # still in use: keep it among the newest
            return
        else:
            _LEARNT[text] = None
            while len(_LEARNT) > MAX_LEARNT_SECRETS:
                _PENDING.discard(_LEARNT.popitem(last=False)[0])
        _PENDING.add(text)
        if pinned or len(_PENDING) >= MAX_PENDING:
            _rebuild()


def _trie_regex(words: set[str]) -> str:
    """One regex matching any of ``words``, shaped as a prefix tree.

    A flat ``a|b|c`` makes the regex engine try every secret at every
    position; the tree tries one character per branch, so a line costs about
    the same with a thousand secrets as with ten. Longer secrets win.
    """
    end = ""  # a key no character can be
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for ch in word:
            node = node.setdefault(ch, {})
        node[end] = None

    def emit(node: dict[str, Any]) -> str:
        out = ""
        while len(node) == 1 and end not in node:  # a chain: no branching, no recursion
            ((ch, node),) = node.items()
            out += re.escape(ch)
        alts = [re.escape(ch) + emit(child) for ch, child in node.items() if ch != end]
        if not alts:
            return out
        group = "(?:" + "|".join(alts) + ")"
        return out + (group + "?" if end in node else group)  # greedy: the longer secret first

    return emit(root)


def _compile(source: str) -> re.Pattern[str]:
    # re.compile would keep every rebuilt (large) pattern in its module cache
    compiler = getattr(re, "_compiler", None)
    return compiler.compile(source, 0) if compiler is not None else re.compile(source)


def _rebuild() -> None:
    """Compile the redaction pattern; the caller holds _LOCK."""
    global _PATTERN
    words = _PINNED | _LEARNT.keys()
    _PATTERN = _compile(_trie_regex(words)) if words else None
    _PENDING.clear()


def tracked_secrets() -> int:
    """How many secrets are being redacted."""
    with _LOCK:
        return len(_PINNED) + len(_LEARNT)


def redact(text: str) -> str:
    if _PENDING and any(secret in text for secret in list(_PENDING)):
        with _LOCK:  # a secret newer than the pattern is in this line: include it now
            if _PENDING:
                _rebuild()
    pattern = _PATTERN  # one read: a concurrent rebuild swaps in a whole new pattern
    return pattern.sub("***", text) if pattern is not None else text


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STD_ATTRS and not k.startswith("_")}


def iso_time(epoch: float) -> str:
    """ISO 8601 with milliseconds and the local zone's offset, e.g. 2026-11-30T12:00:00.123+00:00."""
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(doc, default=str))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = iso_time(record.created)
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def check_level(level: str, key: str = "log_level") -> None:
    """A settings check (see ``novacron.config.load``): ``level`` must be one of LEVELS."""
    if level.lower() not in LEVELS:
        raise Invalid(key, f"expected one of {', '.join(LEVELS)}, got {level!r}")


def setup(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure the root logger once per process. ``fmt`` is json, text or auto."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would print Authorization-bearing URLs verbatim at info.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
