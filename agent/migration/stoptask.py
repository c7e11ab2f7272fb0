"""Stopping a task for sure.

On Python 3.11 a cancellation can be lost: ``asyncio.wait_for`` returns the inner
result instead of raising ``CancelledError`` when the inner call completes in the same
step as the cancel (fixed in 3.12, where ``wait_for`` was rewritten). The channel's
reads and drains use ``wait_for``, so a receive loop told once to stop may carry on
reading. The engine's watchdogs (a dead QEMU, a silent peer) must end the work they
guard within their bound, so they cancel until the task is done.
"""

from __future__ import annotations

import asyncio
from typing import Any

RETRY_S = 0.2  # cancel again this often while the task runs on


async def stop(task: asyncio.Task[Any], bound_s: float = 30.0) -> bool:
    """Cancel ``task`` (again every RETRY_S) until it is done, for at most ``bound_s``;
    True if it ended. Its outcome (result, error or cancellation) is not raised here."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound_s
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=max(0.0, min(RETRY_S, deadline - loop.time())))
        if loop.time() >= deadline:
            break
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: the caller decides what the stop means
    return task.done()
