"""One shared worker pool for the nogil kernels (threads, not processes: the
kernels release the GIL and work on the caller's buffers in place)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}


def pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool with ``threads`` workers (created on first use)."""
    with _LOCK:
        ex = _POOLS.get(threads)
        if ex is None:
            ex = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"nc-native{threads}")
            _POOLS[threads] = ex
        return ex


def check_threads(threads: int) -> int:
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 64:
        raise ValueError(f"threads must be an integer from 1 to 64, got {threads!r}")
    return threads
