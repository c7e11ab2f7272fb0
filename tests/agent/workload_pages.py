"""Recompute the workload's page contents (mirrors agent/guest/workload.c) so a
test can find one of its pages in memory and corrupt it on purpose."""

from __future__ import annotations

import struct

MASK = (1 << 64) - 1
PAGE = 4096


def mix64(x: int) -> int:
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & MASK
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & MASK
    x ^= x >> 33
    return x


def page_prefix(boot_id: int, idx: int, gen: int = 1, words: int = 4) -> bytes:
    """The first ``words`` 64-bit words the workload writes into page ``idx``."""
    s = mix64(((idx << 32) ^ gen ^ boot_id) & MASK)
    out = []
    for _ in range(words):
        s ^= (s << 13) & MASK
        s ^= s >> 7
        s ^= (s << 17) & MASK
        out.append(s)
    return struct.pack(f"<{words}Q", *out)
