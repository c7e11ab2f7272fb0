"""Test-mode RAM digest: BLAKE3 of the whole guest RAM (both sides paused)."""

from __future__ import annotations

from typing import Any

import blake3


def ram_digest(mem: Any) -> str:
    with memoryview(mem) as view:  # released here, not when a traceback lets go of it
        return blake3.blake3(view, max_threads=blake3.blake3.AUTO).hexdigest()
