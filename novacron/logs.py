"""Structured logging shared by every NovaCron process.

One JSON object per line (or ``key=value`` text on a terminal), with any
registered secret scrubbed from the message and its fields before output.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

from novacron.config import Invalid

LEVELS = ("debug", "info", "warning", "error", "critical")  # what setup() takes, any case

_SECRETS: set[str] = set()
_LOCK = threading.Lock()
_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def register_secret(value: str | bytes | None) -> None:
    """Never let ``value`` reach a log line (tokens, cluster secrets, keys)."""
    if not value:
        return
    text = value.hex() if isinstance(value, bytes) else value
    if len(text) >= 4:
        with _LOCK:
            _SECRETS.add(text)


def redact(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
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
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
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
