"""``stoptask.stop`` ends a task that swallows a cancellation (as ``wait_for`` may on
Python 3.11 when the inner call completes in the same step as the cancel)."""

from __future__ import annotations

import asyncio

from novacron.agent.migration import stoptask


async def test_a_task_that_swallows_one_cancel_is_stopped() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # the first cancel is lost, as in the race

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await stoptask.stop(task, bound_s=5)
    assert task.cancelled() and swallowed == 1
    assert loop.time() - t0 < 1.0  # the second cancel came after one retry interval


async def test_a_task_that_never_ends_is_given_up_after_the_bound() -> None:
    deaf_now = True

    async def deaf() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if not deaf_now:
                    raise

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    assert not await stoptask.stop(task, bound_s=0.5)
    deaf_now = False  # the test's own cleanup
    assert await stoptask.stop(task, bound_s=5)
