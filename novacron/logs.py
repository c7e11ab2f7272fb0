"""Structured logging shared by every NovaCron process.

One JSON object per line (or ``key=value`` text on a terminal), with any
registered secret scrubbed from the message and its fields before output.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import OrderedDict
from datetime import datetime
from typing import Any

from novacron.config import Invalid

LEVELS = ("debug", "info", "warning", "error", "critical")  # what setup() takes, any case

# The process's own secrets (from its config) are pinned: never evicted. Secrets
# learnt while running (agent tokens, migration targets) are kept newest-first up
# to MAX_LEARNT_SECRETS, so a long-lived coordinator's list stays bounded. Adding
# or dropping one costs O(its length), never O(number of secrets): registrations
# happen on the event loop, once per agent.
MAX_LEARNT_SECRETS = 65536
MIN_SECRET = 4  # shorter values are not secrets (and would redact half of every line)
_PINNED: set[str] = set()
_LEARNT: OrderedDict[str, None] = OrderedDict()
_LOCK = threading.Lock()
_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _forms(secret: str) -> set[str]:
    """How ``secret`` can appear in a log line: as is, JSON-escaped (our JSON lines,
    ASCII-only or not), and as Python's repr shows it (tracebacks, ``%r``), alone
    or inside a JSON string."""
    shown = repr(secret)[1:-1]
    forms = {secret, shown}
    for text in (secret, shown):
        forms.add(json.dumps(text)[1:-1])
        forms.add(json.dumps(text, ensure_ascii=False)[1:-1])
    return {f for f in forms if len(f) >= MIN_SECRET}


class _FormIndex:
    """Every form of every secret in a prefix tree, changed in place.

    A node is a dict from the next character to a child node, or to the rest
    of a form as a plain string once that form is the only one on its branch
    (so a secret costs about one string plus the few nodes where it first
    differs from the others, not one node per character). Adding or dropping a
    form touches only its own path: secrets often share long prefixes such as
    ``agt-``, which buckets keyed by a prefix would pile up. A line is scanned
    once; at each position the walk follows the line while the tree has it,
    and the longest form starting there wins. Lookups need no lock: a change
    swaps in whole nodes, so a walk sees the tree before or after it.
    """

    _END = ""  # a key no character can be: a form ends at this node

    def __init__(self) -> None:
        self._root: dict[str, Any] = {}
        self._refs: dict[str, int] = {}  # two secrets can share a form

    def add(self, secret: str) -> None:
        for form in _forms(secret):
            self._refs[form] = self._refs.get(form, 0) + 1
            if self._refs[form] == 1:
                self._insert(form)

    def _insert(self, form: str) -> None:
        node, i = self._root, 0
        while i < len(form):
            ch, rest = form[i], form[i + 1:]
            child = node.get(ch)
            if child is None:
                node[ch] = rest
                return
            if isinstance(child, str):
                if child == rest:
                    return
                # push the other form's rest one level down, then carry on beside it
                child = {self._END: True} if child == "" else {child[0]: child[1:]}
                node[ch] = child
            node, i = child, i + 1
        node[self._END] = True

    def discard(self, secret: str) -> None:
        for form in _forms(secret):
            left = self._refs.get(form, 0) - 1
            if left > 0:
                self._refs[form] = left
            elif self._refs.pop(form, None) is not None:
                self._remove(form)

    def _remove(self, form: str) -> None:
        path: list[tuple[dict[str, Any], str]] = []
        node, i = self._root, 0
        while i < len(form):
            child = node.get(form[i])
            if isinstance(child, str):
                if child == form[i + 1:]:
                    del node[form[i]]
                break
            if child is None:
                return
            path.append((node, form[i]))
            node, i = child, i + 1
        else:
            node.pop(self._END, None)
        for parent, ch in reversed(path):  # drop the nodes only this form used
            if parent[ch]:
                break
            del parent[ch]

    def redact(self, text: str) -> str:
        root, end_key = self._root, self._END
        if not root:
            return text
        out: list[str] = []
        i = last = 0
        n = len(text)
        while i < n:
            node: Any = root
            hit = 0
            j = i
            while True:
                if end_key in node:
                    hit = j
                if j == n:
                    break
                node = node.get(text[j])
                if node is None:
                    break
                j += 1
                if isinstance(node, str):
                    if text.startswith(node, j):
                        hit = j + len(node)
                    break
            if hit > i:
                out.append(text[last:i])
                out.append("***")
                i = last = hit
            else:
                i += 1
        if not out:
            return text
        out.append(text[last:])
        return "".join(out)


_INDEX = _FormIndex()


def register_secret(value: str | bytes | None, *, pinned: bool = True) -> None:
    """Never let ``value`` reach a log line (tokens, cluster secrets, keys).

    A process's own configured secrets are pinned (never forgotten). Secrets
    learnt while running (agents' tokens, migration targets' tokens) pass
    ``pinned=False``: only the newest MAX_LEARNT_SECRETS of those are kept.
    """
    if not value:
        return
    text = value.hex() if isinstance(value, bytes) else value
    if len(text) < MIN_SECRET:
        return
    with _LOCK:
        if text in _PINNED:
            return
        if pinned:
            _PINNED.add(text)
            if text in _LEARNT:  # already indexed: now it is never evicted
                del _LEARNT[text]
                return
        elif text in _LEARNT:
            _LEARNT.move_to_end(text)  # still in use: keep it among the newest
            return
        else:
            _LEARNT[text] = None
            while len(_LEARNT) > MAX_LEARNT_SECRETS:
                _INDEX.discard(_LEARNT.popitem(last=False)[0])
        _INDEX.add(text)


def tracked_secrets() -> int:
    """How many secrets are being redacted."""
    with _LOCK:
        return len(_PINNED) + len(_LEARNT)


def redact(text: str) -> str:
    return _INDEX.redact(text)


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
