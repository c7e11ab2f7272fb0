"""File-backed stand-ins for a VM, for engine tests that need no QEMU.

The "guest" is a RAM file plus a thread dirtying random pages while it runs;
its "device state" is a blob pushed through the same unix-socket hand-over
QEMU uses. Everything the engine does to RAM (scan, encode, encrypt, relay)
is the real code path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np

from novacron.agent.migration.unixsock import start_unix_server_at
from novacron.agent.migration.vmport import AdmissionError
from novacron.agent.qmp import open_unix
from novacron.agent.vm.ramfile import Reservation, create_ram_file

PAGE = 4096


class MemSourceVM:
    def __init__(self, root: Path, name: str, pages: int, dirty_pages_per_s: float = 0.0,
                 seed: int = 1, hot_pages: int | None = None, expose_pid: bool = True,
                 touch_all: bool = False) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.work_dir = self.dir  # pytest's tmp paths exceed sun_path: the long-path case
        self.ram_path = self.dir / "ram"
        self.ram_size = pages * PAGE
        rng = np.random.default_rng(seed)
        data = np.zeros(self.ram_size, np.uint8)
        # a realistic mix: some zero pages, some duplicate pages, some random pages
        view = data.reshape(pages, PAGE)
        view[: pages // 2] = rng.integers(0, 256, size=(pages // 2, PAGE), dtype=np.uint8)
        view[pages // 2 : 3 * pages // 4] = 7
        self.ram_path.write_bytes(data.tobytes())
        self.ram_stat: os.stat_result | None = self.ram_path.stat()
        fd = os.open(self.ram_path, os.O_RDWR)
        self.mm = mmap.mmap(fd, self.ram_size)
        os.close(fd)
        if touch_all:  # as a guest's boot maps its RAM: every page in "QEMU"'s page tables
            bytes(self.mm[::PAGE])
        self.device_state = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
        self.rate = dirty_pages_per_s
        # the "guest" writes only its first hot_pages pages (default: all of them)
        self.hot_pages = min(hot_pages or pages, pages)
        # this process plays QEMU: its writable mapping is self.mm
        self.pid: int | None = os.getpid() if expose_pid else None
        self._running = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._dirty, daemon=True)
        self._send: asyncio.Task[None] | None = None
        self.paused_count = 0
        self.resumed_count = 0
        self.released = False
        self.stayed = False
        self.dirtied = 0
        self.paused = False
        self.pause_error: Exception | None = None  # raised after the guest really stopped
        if dirty_pages_per_s > 0:
            self._running.set()
            self._thread.start()

    def _dirty(self) -> None:
        rng = np.random.default_rng(99)
        npages = self.hot_pages
        while not self._stop.is_set():
            if not self._running.wait(0.05):
                continue
            with self._lock:
                if not self._running.is_set():
                    continue
                for p in rng.integers(0, npages, 32):
                    off = int(p) * PAGE
                    self.mm[off : off + 8] = rng.integers(0, 2**63, dtype=np.int64).tobytes()
                self.dirtied += 32
            # the workload's pace: 32 pages per step at the configured rate
            self._stop.wait(32 / self.rate if self.rate else 0.05)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "vcpus": 1, "memory_mb": self.ram_size >> 20}

    async def pause(self) -> None:
        self.paused = True
        self._running.clear()
        with self._lock:  # wait for a write in flight
            self.paused_count += 1
        if self.pause_error is not None:
            raise self.pause_error

    async def resume(self) -> None:
        self.resumed_count += 1
        self.paused = False
        if self.rate > 0:
            self._running.set()

    @property
    def running(self) -> bool:
        return not self.paused and not self.released

    async def send_device_state(self, socket_path: Path) -> None:
        assert socket_path.parent == self.work_dir, socket_path

        async def push() -> None:
            _, w = await open_unix(str(socket_path))
            for i in range(0, len(self.device_state), 65536):
                w.write(self.device_state[i : i + 65536])
                await w.drain()
            w.close()
            await w.wait_closed()

        self._send = asyncio.create_task(push())

    async def wait_device_state_sent(self, timeout: float) -> None:
        assert self._send is not None
        await asyncio.wait_for(self._send, timeout)

    async def cancel_device_state(self) -> None:
        if self._send is not None:
            self._send.cancel()

    async def stay(self) -> None:
        self.stayed = True

    async def release(self) -> None:
        self.released = True
        self.close()
        shutil.rmtree(self.dir)

    def close(self) -> None:
        self._stop.set()
        self._running.set()
        if self._thread.is_alive():
            self._thread.join(5)
        with contextlib.suppress(BufferError, ValueError):
            self.mm.close()


class MemDestVM:
    def __init__(self, name: str, vm_dir: Path, ram_path: Path) -> None:
        self.name = name
        self.dir = vm_dir
        self.ram_path = ram_path
        self.ram_stat: os.stat_result | None = ram_path.stat()
        self.device_state = bytearray()
        self._server: asyncio.AbstractServer | None = None
        self._loaded = asyncio.Event()
        self.running = False
        self.adopted = False
        self.destroyed = False
        self.fail_resume = False
        self.destroy_error: Exception | None = None
        self.exited = asyncio.Event()  # set by a test: the "QEMU" died
        self.adopt_error: Exception | None = None  # e.g. the state dir filled up
        self.reservation: Reservation | None = None  # its RAM file's space, still being reserved
        # as an incoming QEMU VM still starting (QemuDest.early): pages may arrive before
        # it listens for device state, which takes start_delay_s, or fails with start_error
        self.early = False
        self.start_delay_s = 0.0
        self.start_error: Exception | None = None
        self.listened_at: float | None = None

    async def wait_exited(self) -> str:
        await self.exited.wait()
        return "killed by the test"

    async def listen_device_state(self) -> str:
        await asyncio.sleep(self.start_delay_s)
        if self.start_error is not None:
            raise self.start_error
        self.listened_at = asyncio.get_running_loop().time()
        path = self.dir / "dev.sock"  # inside the VM folder, as QEMU's incoming socket

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while chunk := await r.read(65536):
                self.device_state += chunk
            w.close()
            self._loaded.set()

        self._server = await start_unix_server_at(on_conn, path)
        return str(path)

    async def wait_device_state_loaded(self, timeout: float) -> None:
        await asyncio.wait_for(self._loaded.wait(), timeout)

    async def resume(self) -> None:
        if self.fail_resume:
            raise RuntimeError("guest would not start here")
        self.running = True

    async def destroy(self) -> None:
        if self.destroy_error is not None:
            raise self.destroy_error
        if self.reservation is not None:
            await self.reservation.close()
        self.destroyed = True
        self._close_server()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def adopt(self) -> None:
        if self.adopt_error is not None:
            raise self.adopt_error
        self.adopted = True
        self._close_server()

    def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                (self.dir / "dev.sock").unlink()


class MemDestFactory:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.vms: dict[str, MemDestVM] = {}
        self.prepared = 0
        self.fail_resume = False  # make every destination VM refuse to resume
        self.prepare_error: Exception | None = None  # an unexpected failure while preparing
        self.destroy_error: Exception | None = None  # destroying a destination VM fails
        # the RAM file sized now and its space reserved while pages arrive (as an
        # incoming QEMU VM's, ramfile.Reservation)
        self.reserve_later = False
        self.early: tuple[float, Exception | None] | None = None  # (start delay, start error): see MemDestVM

    async def prepare(self, spec: dict[str, Any], ram_size: int, migration_id: str,
                      disks: list[dict[str, Any]] | None = None) -> MemDestVM:
        name = str(spec.get("name"))
        if self.prepare_error is not None:
            raise self.prepare_error
        vm_dir = self.root / name
        try:
            vm_dir.mkdir(parents=True)
        except FileExistsError:
            raise AdmissionError(f"VM {name!r} already exists here") from None
        ram = vm_dir / "ram"
        if self.reserve_later:
            _, reservation = await create_ram_file(ram, ram_size)
            self.prepared += 1
            vm = MemDestVM(name, vm_dir, ram)
            vm.reservation = reservation
            self.vms[name] = vm
            return vm
        fd = os.open(ram, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, ram_size)
        except OSError as exc:
            shutil.rmtree(vm_dir, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise AdmissionError(f"out of space for the {ram_size} byte RAM file") from None
            raise AdmissionError(str(exc)) from None
        finally:
            os.close(fd)
        self.prepared += 1
        vm = MemDestVM(name, vm_dir, ram)
        if self.early is not None:
            vm.early = True
            vm.start_delay_s, vm.start_error = self.early
        vm.fail_resume = self.fail_resume
        vm.destroy_error = self.destroy_error
        self.vms[name] = vm
        return vm
