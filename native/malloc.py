"""glibc allocator settings for a process that moves guest RAM in 1 MiB frames.

Every frame (sealed on the source, received and decrypted at the destination) is
a fresh buffer of about 1 MiB. glibc serves such sizes with ``mmap`` until its
adaptive threshold moves, and gives heap memory back to the kernel past
``M_TRIM_THRESHOLD`` (128 KiB): either way each frame's memory was faulted in
and zeroed by the kernel again, then unmapped (measured: about a fifth of the
destination agent's CPU per byte received). Fixed thresholds keep freed frames
in the heap for the next one. The heap then stays at its peak (frames in flight,
a few MiB) instead of shrinking after each migration.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("novacron.native")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit: larger blocks (a scan's bitmaps) still use mmap
TRIM_THRESHOLD = 64 << 20  # free heap above this is returned to the kernel


def keep_freed_buffers() -> bool:
    """Apply the thresholds above (glibc only; elsewhere nothing changes). True if applied."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.info("allocator thresholds left as they are (no glibc mallopt)")
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("allocator thresholds could not be set")
    return ok
