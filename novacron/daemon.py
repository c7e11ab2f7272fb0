"""What the daemons (``novacron-agent``, ``novacron-coordinator``) share.

The entry point's shape (flags from the settings schema, layered config with
checks, one-line config errors, secrets kept out of logs, Ctrl-C without a
traceback) and the server's (listen, report the bound port, serve until
SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from aiohttp import web

from novacron import __version__, config, logs
from novacron.connlimits import (
    GuardedSite,
    HttpGuard,
    HttpLimits,
    raise_fd_limit,
    rate_limited_exception_handler,
)

T = TypeVar("T")
log = logging.getLogger("novacron.daemon")
GC_FULL_EVERY_S = 600.0  # a full garbage collection (the coordinator's default; see tune_gc)


@dataclass(frozen=True)
class Daemon(Generic[T]):
    prog: str
    description: str
    settings: type[T]  # a settings dataclass with a ``log_level``
    env_prefix: str
    default_config: Path
    check: Callable[[T], None]  # raises config.Invalid for a value that cannot work
    secrets: Callable[[T], Iterable[str]]  # settings that must never reach a log line
    serve: Callable[[T], Awaitable[None]]  # runs until signalled
    gc_full_every_s: float = GC_FULL_EVERY_S

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=self.prog,
            description=self.description,
            epilog=f"Config file: --config, ${self.env_prefix}_CONFIG or {self.default_config}. "
            f"Every setting can also be given as ${self.env_prefix}_<KEY>.",
        )
        parser.add_argument("--version", action="version", version=f"{self.prog} {__version__}")
        parser.add_argument("--config", metavar="PATH",
                            help=f"TOML config file (default: {self.default_config} if it exists)")
        config.add_flags(parser, self.settings)
        return parser

    def load(self, argv: list[str] | None) -> T:
        """Settings from flags, environment and file; a bad value exits with one line."""
        args = self.parser().parse_args(argv)
        return config.load_or_exit(self.settings, args, prog=self.prog, env_prefix=self.env_prefix,
                                   default_path=self.default_config, check=self.check)

    def main(self, argv: list[str] | None = None) -> int:
        cfg = self.load(argv)
        logs.setup(str(getattr(cfg, "log_level", "info")))
        for secret in self.secrets(cfg):
            logs.register_secret(secret)

        raise_fd_limit()  # a systemd default of 1,024 is too few for a fleet's connections
        tune_gc()

        async def run() -> None:
            asyncio.get_running_loop().set_exception_handler(rate_limited_exception_handler())
            collector = asyncio.create_task(collect_garbage(full_every_s=self.gc_full_every_s),
                                            name="garbage collection")
            try:
                await self.serve(cfg)
            finally:
                collector.cancel()

        try:
            asyncio.run(run())
        except KeyboardInterrupt:
            pass
        except StartupError as exc:
            raise SystemExit(f"{self.prog}: error: {exc}") from None
        except OSError as exc:  # e.g. a data dir it may not create: one line, not a traceback
            raise SystemExit(f"{self.prog}: error: {describe_os_error(exc)}") from None
        return 0


GC_PAUSE_WARN_S = 0.1

# Python's collector on a server with thousands of keep-alive connections. Each aiohttp
# connection keeps its last request's objects (request, response, headers, URL: ~30) until
# the next request replaces them, one heartbeat interval later. New ones are born as fast
# as old ones die, so the young generation's trigger (allocations minus deallocations)
# fires late and irregularly, and each young collection then walks every connection's last
# request: at 10,000 agents, 120,000-440,000 objects and 80-350 ms per collection at any
# threshold (measured with gc.get_objects(0) in a gc callback under `bench fleet`), and the
# survivors soon filled the old generation, whose collections paused 0.3-1.7 s every few
# seconds with CPython's defaults. So the schedule is ours: the young generation every
# GC_YOUNG_EVERY_S (only what was born since: a few thousand objects, a few ms), the
# threshold as a backstop for bursts, and the older generations only every few minutes
# (Daemon.gc_full_every_s: an agent's heap is small, so its full collections are short and
# more frequent, and a failed migration's buffers caught in a cycle go sooner). Objects that
# die by reference count (nearly all of them) are freed at once in any generation; only
# cyclic garbage waits for the full collection.
GC_YOUNG_EVERY_S = 0.1
GC_YOUNG_THRESHOLD = 10_000
GC_NEVER = 1 << 30  # a generation count no daemon reaches: older generations run on our schedule


def tune_gc() -> None:
    """Take the older generations off the allocation trigger (see above), and log a
    collection that stopped the daemon for more than GC_PAUSE_WARN_S (the event loop,
    heartbeats and migrations wait meanwhile)."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_NEVER, GC_NEVER)
    started = [0.0, 0.0]  # wall, this thread's CPU: far apart, the host starved us mid-collection
    log = logging.getLogger("novacron.gc")

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = time.perf_counter(), time.thread_time()
            return
        took = time.perf_counter() - started[0]
        if took > GC_PAUSE_WARN_S:
            log.warning("garbage collection paused the daemon", extra={
                "generation": info["generation"], "pause_ms": round(took * 1e3),
                "cpu_ms": round((time.thread_time() - started[1]) * 1e3),
                "collected": info["collected"]})

    gc.callbacks.append(callback)


async def collect_garbage(young_every_s: float = GC_YOUNG_EVERY_S,
                          full_every_s: float = GC_FULL_EVERY_S) -> None:
    """The collection schedule of tune_gc, until cancelled."""
    loop = asyncio.get_running_loop()
    full_at = loop.time() + full_every_s
    while True:
        await asyncio.sleep(young_every_s)
        if loop.time() >= full_at:
            gc.collect()
            full_at = loop.time() + full_every_s
        else:
            gc.collect(0)


class StartupError(Exception):
    """The daemon cannot start (port taken, store unusable...): one line for the operator."""


def describe_os_error(exc: OSError) -> str:
    """``Permission denied: /var/lib/x`` rather than ``[Errno 13] Permission denied: '/var/lib/x'``."""
    if exc.strerror and exc.filename is not None:
        return f"{exc.strerror.lower()}: {exc.filename}"
    return exc.strerror.lower() if exc.strerror else str(exc)


class ListenError(StartupError, OSError):
    """The address cannot be bound; keeps ``errno`` for callers that look at it."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        where = f"[{host}]" if ":" in host else host
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        OSError.__init__(self, exc.errno or 0, f"cannot listen on {where}:{port}: {reason}")

    def __str__(self) -> str:
        return str(self.strerror)


async def start_site(app: web.Application, host: str, port: int, limits: HttpLimits | None = None, *,
                     ssl_context: Any = None) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on host:port; the port actually bound (``port`` 0 picks a free one).

    Connections are bounded by ``limits`` (see novacron.connlimits): a deadline for
    request heads, an idle timeout and a cap with the oldest idle one evicted first.
    """
    limits = limits or HttpLimits()
    guard = HttpGuard(limits)
    app.middlewares.insert(0, guard.middleware)  # outermost: every request marks its connection busy
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=limits.idle_timeout_s)
    try:
        await runner.setup()  # the app's start-up hooks: opening the store, resuming work
    except Exception as exc:
        log.debug("start-up failed", exc_info=True)  # the whole story for --log-level debug
        raise StartupError(f"start-up failed: {type(exc).__name__}: {exc}") from exc
    try:
        await GuardedSite(runner, host, port, guard, ssl_context=ssl_context).start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(host, port, exc) from None
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, int(bound)


async def until_signalled() -> None:
    """Return on the first SIGINT or SIGTERM.

    The handlers stay installed, so a second signal cannot interrupt the caller's clean-up.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
