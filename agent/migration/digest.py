"""Test-mode RAM digest: BLAKE3 of the whole guest RAM (both sides paused)."""

from __future__ import annotations

from typing import Any

import blake3


def ram_digest(mem: Any) -> str:
    return blake3.blake3(memoryview(mem), max_threads=blake3.blake3.AUTO).hexdigest()
