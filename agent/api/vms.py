"""``/v1/vms``: create, list, inspect, start/stop/pause/resume, delete; the serial console."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import WSMsgType, web

from novacron.agent.api.common import json_error, read_json_object
from novacron.agent.appkeys import CONFIG, VMS
from novacron.agent.qmp import open_unix
from novacron.agent.safefs import UnsafeFile
from novacron.agent.vm.errors import VMConflict
from novacron.audit import ACTOR, AUDIT
from novacron.faults import crash_point

log = logging.getLogger("novacron.agent.api")

ACTIONS = ("start", "stop", "pause", "resume", "reboot")
MAX_SHUTDOWN_TIMEOUT_S = 3600.0
MAX_CONSOLE_INPUT = 1024
MAX_CONSOLE_OUTPUT = 1024 * 1024
MAX_CONSOLE_OFFSET = 2**53  # past any real log; larger values would overflow seek()
MAX_CONSOLE_HISTORY = 64 * 1024  # bytes of recent output a console session may start with
CONSOLE_READ = 4096


async def list_vms(request: web.Request) -> web.Response:
    return web.json_response({"vms": [vm.status() for vm in request.app[VMS].list()]})


async def create_vm(request: web.Request) -> web.Response:
    doc = await read_json_object(request)
    vm = await request.app[VMS].create(doc)
    crash_point("vm.create.responding")
    return web.json_response(vm.status(), status=201)


async def get_vm(request: web.Request) -> web.Response:
    return web.json_response(request.app[VMS].get(request.match_info["name"]).status())


async def vm_action(request: web.Request) -> web.Response:
    name, action = request.match_info["name"], request.match_info["action"]
    manager = request.app[VMS]
    if action not in ACTIONS:
        manager.get(name)  # an unknown VM is the more useful 404
        return json_error(404, f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    if action in ("resume", "start"):
        return await _unfenced(request, name, action)
    if action in ("stop", "reboot"):
        return await _power(request, name, action)
    vm = await getattr(manager, action)(name)
    return web.json_response(vm.status())


def _power_options(request: web.Request) -> tuple[bool, float]:
    """``?force=true|false&timeout_s=S`` of stop and reboot (default: the stop_timeout_s setting)."""
    force = request.query.get("force", "false")
    if force not in ("true", "false"):
        raise web.HTTPBadRequest(reason="force: expected true or false")
    timeout = request.app[CONFIG].stop_timeout_s
    if "timeout_s" in request.query:
        try:
            timeout = float(request.query["timeout_s"])
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= MAX_SHUTDOWN_TIMEOUT_S:  # also refuses nan
            raise web.HTTPBadRequest(reason=f"timeout_s: expected seconds in (0, {MAX_SHUTDOWN_TIMEOUT_S:g}]")
    return force == "true", timeout


async def _power(request: web.Request, name: str, action: str) -> web.Response:
    """``stop``: graceful (ACPI power button, then power-off after the timeout) unless
    ``force``; ``reboot``: the guest shuts down, then a reset (``force``: reset at once).
    The reply is the VM's status with ``outcome`` (graceful, seconds, reason)."""
    force, timeout = _power_options(request)
    manager = request.app[VMS]
    if action == "stop" and force:
        vm = await manager.stop(name)
        outcome = {"graceful": False, "seconds": 0.0, "reason": "forced power-off"}
    elif action == "stop":
        vm, outcome = await manager.power_down(name, timeout)
    else:
        vm, outcome = await manager.reboot(name, force=force, timeout=timeout)
    return web.json_response({**vm.status(), "outcome": outcome})


async def _unfenced(request: web.Request, name: str, action: str) -> web.Response:
    """Resume or start, both refused (409) while a migration of the VM is unsettled;
    ``?force=true`` overrides that (only when the peer host is known dead), and the
    override is recorded in the audit log with what it overrode."""
    manager = request.app[VMS]
    force = request.query.get("force", "false")
    if force not in ("true", "false"):
        return json_error(400, "force: expected true or false")
    fence = manager.resume_fence
    why = fence.fence_reason(name) if fence is not None and force == "true" else None
    if fence is not None and why is not None:
        manager.get(name)  # an unknown VM stays a 404
        await fence.override(name)  # 409 while the engine itself still runs the migration
        if AUDIT in request.app:
            await request.app[AUDIT].record(actor=request.get(ACTOR, "-"), remote=request.remote or "-",
                                            action=f"{action} forced past an unsettled migration",
                                            target=name, result="ok", status=200, detail=why)
    vm = await (manager.resume(name) if action == "resume" else manager.start(name))
    return web.json_response(vm.status())


async def delete_vm(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await request.app[VMS].delete(name)
    return web.json_response({"deleted": name})


async def console_write(request: web.Request) -> web.Response:
    """Type ``{"text": ...}`` on the guest's serial console."""
    vm = request.app[VMS].get(request.match_info["name"])
    doc = await read_json_object(request)
    text = doc.get("text")
    if not isinstance(text, str) or not text or len(text) > MAX_CONSOLE_INPUT:
        return json_error(400, f"text: expected a non-empty string of at most {MAX_CONSOLE_INPUT} characters")
    await vm.send_serial(text)
    return web.json_response({"sent": len(text)})


async def console_read(request: web.Request) -> web.Response:
    """The serial log from byte ``offset`` (at most 1 MiB per call)."""
    try:
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        return json_error(400, "offset: expected a non-negative integer")
    if not 0 <= offset <= MAX_CONSOLE_OFFSET:
        return json_error(400, f"offset: out of range 0..{MAX_CONSOLE_OFFSET}")
    vm = request.app[VMS].get(request.match_info["name"])
    try:
        # a chatty guest's log can be large; trimmed history makes ``offset`` move on
        start, data = vm.read_serial_at(offset, MAX_CONSOLE_OUTPUT)
    except UnsafeFile:  # something (QEMU?) replaced the log with a symlink or fifo
        log.warning("serial log refused: not a regular file", extra={"vm": vm.name})
        return json_error(409, "the serial log is not a regular file")
    return web.json_response({"offset": start, "next_offset": start + len(data),
                              "text": data.decode(errors="replace")})


async def console_session(request: web.Request) -> web.StreamResponse:
    """``GET /v1/vms/NAME/console/ws``: a WebSocket joined to the guest's serial port.
    Binary frames carry bytes both ways (text frames from the client are typed as
    UTF-8); ``?history=BYTES`` first sends that much recent output. One session per VM
    at a time (QEMU serves one connection); the console API's writes go through it."""
    vm = request.app[VMS].get(request.match_info["name"])
    try:
        history = int(request.query.get("history", "0"))
    except ValueError:
        history = -1
    if not 0 <= history <= MAX_CONSOLE_HISTORY:
        return json_error(400, f"history: expected bytes in 0..{MAX_CONSOLE_HISTORY}")
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_CONSOLE_INPUT * 4)
    if not ws.can_prepare(request).ok:
        return json_error(400, "expected a WebSocket upgrade")
    if not vm.alive:
        raise VMConflict(f"VM {vm.name} is {vm.state}; its console is not running")
    if vm.console_writer is not None:
        raise VMConflict(f"a console session to {vm.name} is attached already")
    reader, writer = await asyncio.wait_for(open_unix(str(vm.paths.serial_sock)), 5.0)
    vm.console_writer = writer
    try:
        await ws.prepare(request)
        log.info("console attached", extra={"vm": vm.name, "remote": request.remote})
        if history:
            end = vm.serial_end()
            _start, recent = vm.read_serial_at(max(0, end - history), history)
            if recent:
                await ws.send_bytes(recent)

        async def guest_to_client() -> None:
            while data := await reader.read(CONSOLE_READ):
                await ws.send_bytes(data)

        async def client_to_guest() -> None:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    writer.write(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    writer.write(msg.data.encode())
                else:
                    continue
                await writer.drain()

        pumps = [asyncio.create_task(guest_to_client()), asyncio.create_task(client_to_guest())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for task in pumps:
                with contextlib.suppress(BaseException):
                    await task
    finally:
        if vm.console_writer is writer:
            vm.console_writer = None
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        await ws.close()
        log.info("console detached", extra={"vm": vm.name})
    return ws


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/vms", list_vms)
    app.router.add_post("/v1/vms", create_vm)
    app.router.add_get("/v1/vms/{name}", get_vm)
    app.router.add_delete("/v1/vms/{name}", delete_vm)
    app.router.add_get("/v1/vms/{name}/console", console_read)
    app.router.add_get("/v1/vms/{name}/console/ws", console_session)
    app.router.add_post("/v1/vms/{name}/console", console_write)
    app.router.add_post("/v1/vms/{name}/{action}", vm_action)
