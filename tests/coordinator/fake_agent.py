"""A small stand-in speaking the agent HTTP contract, for coordinator tests only.

It keeps VMs in memory and walks a migration through the real phase names one
step per status poll, so the coordinator's orchestration, persistence and SSE
can be tested without QEMU. The demo and its e2e test use real agents.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from novacron.coordinator.client import CoordinatorClient
from novacron.grants import GrantError, GrantVerifier

PHASES = ["prepare", "precopy", "precopy", "precopy", "stopcopy", "commit", "completed"]


class FakeAgent:
    def __init__(self, name: str, token: str, memory_bytes: int = 8 << 30) -> None:
        self.name, self.token, self.memory_bytes = name, token, memory_bytes
        self.vms: dict[str, dict[str, Any]] = {}
        self.actions: list[tuple[str, dict[str, str]]] = []  # (action, query) of each VM action
        self.migrations: dict[str, dict[str, Any]] = {}
        self.fail_next_create: str | None = None
        self.hold_migrations = False  # keep migrations in precopy until released
        self.fail_migrations: str | None = None  # fail each migration in pre-copy with this error
        self.exceed_budget = False  # complete each migration with a pause over its budget
        self.changes: list[dict[str, Any]] = []  # PATCH bodies, as received
        self.calls: list[tuple[str, str]] = []
        self.migration_requests: list[dict[str, Any]] = []
        self.grant_key = ""  # the coordinator's, from the registration reply
        self._ids = itertools.count(1)
        self.peers: dict[str, FakeAgent] = {}  # url -> agent, to hand VMs over on commit
        self.url = ""
        self.networks: list[str] = []  # fleet networks it reports
        # GET /v1/images entries, as the agent lists them
        self.images: list[Any] = [{"name": "vmlinuz", "dir": "/srv/img", "size": 8247232}]
        self.serial: dict[str, str] = {}  # VM name -> its serial console log

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        r = app.router
        r.add_get("/v1/health", self.health)
        r.add_get("/v1/host", self.host)
        r.add_get("/v1/vms", self.list_vms)
        r.add_post("/v1/vms", self.create_vm)
        r.add_get("/v1/vms/{name}", self.get_vm)
        r.add_get("/v1/images", self.list_images)
        r.add_get("/v1/vms/{name}/console", self.console_read)
        r.add_post("/v1/vms/{name}/console", self.console_write)
        r.add_post("/v1/vms/{name}/{action}", self.vm_action)
        r.add_delete("/v1/vms/{name}", self.delete_vm)
        r.add_post("/v1/migrations", self.start_migration)
        r.add_get("/v1/migrations/{id}", self.get_migration)
        r.add_post("/v1/migrations/{id}/cancel", self.cancel_migration)
        r.add_patch("/v1/migrations/{id}", self.change_migration)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append((request.method, request.path))
        if request.path != "/v1/health" and \
                request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "bad token"}, status=401)
        resp: web.StreamResponse = await handler(request)
        return resp

    def used(self) -> int:
        return sum(v["memory_mb"] << 20 for v in self.vms.values())

    def registration(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "token": self.token, "cpus": 8,
                "memory_bytes": self.memory_bytes,
                "memory_available_bytes": self.memory_bytes - self.used(),
                "accel": {"kvm_present": False, "kvm_usable": False, "default": "tcg"},
                "data_port": 1234, "version": "fake", "vms": sorted(self.vms),
                "networks": list(self.networks)}

    async def health(self, _r: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "name": self.name})

    async def host(self, _r: web.Request) -> web.Response:
        return web.json_response(self.registration())

    async def list_vms(self, _r: web.Request) -> web.Response:
        return web.json_response({"vms": list(self.vms.values())})

    async def create_vm(self, r: web.Request) -> web.Response:
        spec = await r.json()
        if self.fail_next_create:
            msg, self.fail_next_create = self.fail_next_create, None
            return web.json_response({"error": msg}, status=400)
        if spec["name"] in self.vms:
            return web.json_response({"error": "exists"}, status=409)
        vm = {**spec, "state": "running", "pid": 4242, "accel": "tcg"}
        self.vms[spec["name"]] = vm
        return web.json_response(vm, status=201)

    async def list_images(self, _r: web.Request) -> web.Response:
        return web.json_response({"dirs": ["/srv/img"], "images": self.images})

    async def console_read(self, r: web.Request) -> web.Response:
        if r.match_info["name"] not in self.vms:
            return web.json_response({"error": "no such vm"}, status=404)
        offset = int(r.query.get("offset", "0"))
        data = self.serial.get(r.match_info["name"], "").encode()[offset:offset + (1 << 20)]
        return web.json_response({"offset": offset, "next_offset": offset + len(data),
                                  "text": data.decode(errors="replace")})

    async def console_write(self, r: web.Request) -> web.Response:
        name = r.match_info["name"]
        if name not in self.vms:
            return web.json_response({"error": "no such vm"}, status=404)
        text = (await r.json())["text"]
        self.serial[name] = self.serial.get(name, "") + text  # echoed, as a shell would
        return web.json_response({"sent": len(text)})

    async def get_vm(self, r: web.Request) -> web.Response:
        vm = self.vms.get(r.match_info["name"])
        if vm is None:
            return web.json_response({"error": "no such vm"}, status=404)
        return web.json_response(vm)

    async def vm_action(self, r: web.Request) -> web.Response:
        vm = self.vms.get(r.match_info["name"])
        if vm is None:
            return web.json_response({"error": "no such vm"}, status=404)
        states = {"stop": "stopped", "start": "running", "pause": "paused", "resume": "running",
                  "reboot": "running"}
        vm["state"] = states[r.match_info["action"]]
        self.actions.append((r.match_info["action"], dict(r.query)))
        if r.match_info["action"] in ("stop", "reboot"):  # as the real agent answers
            forced = r.query.get("force") == "true"
            return web.json_response({**vm, "outcome": {"graceful": not forced, "seconds": 0.5,
                                                        "reason": "forced" if forced else "guest powered off"}})
        return web.json_response(vm)

    async def delete_vm(self, r: web.Request) -> web.Response:
        if self.vms.pop(r.match_info["name"], None) is None:
            return web.json_response({"error": "no such vm"}, status=404)
        return web.json_response({"deleted": r.match_info["name"]})

    async def start_migration(self, r: web.Request) -> web.Response:
        body = await r.json()
        if body["vm"] not in self.vms:
            return web.json_response({"error": "no such vm"}, status=404)
        self.migration_requests.append(body)  # exactly what the coordinator sent (tests read it)
        try:  # like a real agent: the destination comes only from the coordinator's grant
            grant = GrantVerifier(self.grant_key).verify(body["grant"])
        except GrantError as exc:
            return web.json_response({"error": str(exc)}, status=403)
        target = self.peers.get(grant.url)
        if target is None or grant.source != self.name or grant.vm != body["vm"] \
                or grant.target != target.name:
            return web.json_response({"error": "grant names another migration"}, status=403)
        mig_id = grant.migration  # a real agent runs it under the coordinator's id
        self.migrations[mig_id] = {"id": mig_id, "vm": body["vm"], "phase": "prepare", "round": 0,
                                   "step": 0, "target": target, "options": body["options"],
                                   "metrics": {}, "error": None}
        self.vms[body["vm"]]["state"] = "migrating"
        return web.json_response(self._public(mig_id), status=202)

    def _public(self, mig_id: str) -> dict[str, Any]:
        m = self.migrations[mig_id]
        return {k: v for k, v in m.items() if k not in ("target", "step")}

    async def get_migration(self, r: web.Request) -> web.Response:
        mig_id = r.match_info["id"]
        m = self.migrations.get(mig_id)
        if m is None:
            return web.json_response({"error": "no such migration"}, status=404)
        if m["phase"] not in ("completed", "cancelled", "failed") and not (
                self.hold_migrations and m["phase"] == "precopy"):
            m["step"] += 1
            m["phase"] = PHASES[min(m["step"], len(PHASES) - 1)]
            if m["phase"] == "precopy":
                m["round"] += 1
            m["metrics"] = {"pages": 65536, "bytes_raw": 4096 * 1000 * m["step"],
                            "bytes_wire": 1000 * m["step"], "downtime_ms": 0, "total_s": 0.1}
            if self.fail_migrations and m["phase"] == "precopy":
                m["phase"], m["error"] = "failed", self.fail_migrations
                m["metrics"] = {**m["metrics"], **dict.fromkeys(
                    ("dirty_rate", "pages_zero", "pages_dedup", "bytes_postcopy"), 0)}
                self.vms[m["vm"]]["state"] = "running"
            m["metrics"]["progress_pct"] = min(100.0, 15.0 * m["step"])
            if m["phase"] == "completed":
                m["metrics"]["downtime_ms"] = 12.5
                if self.exceed_budget:
                    m["metrics"]["downtime_ms"] = 950.0
                    m["metrics"]["budget_exceeded"] = m["budget_exceeded"] = True
                vm = self.vms.pop(m["vm"])
                vm["state"] = "running"
                m["target"].vms[m["vm"]] = vm
        return web.json_response(self._public(mig_id))

    async def change_migration(self, r: web.Request) -> web.Response:
        """The real agent's rules in short: only live ones, only while it runs."""
        m = self.migrations.get(r.match_info["id"])
        if m is None:
            return web.json_response({"error": "no such migration"}, status=404)
        body = await r.json()
        self.changes.append(body)
        if m["phase"] in ("completed", "cancelled", "failed"):
            return web.json_response({"error": f"migration already {m['phase']}"}, status=409)
        m["options"] = {**m["options"], **body}
        return web.json_response(self._public(r.match_info["id"]))

    async def cancel_migration(self, r: web.Request) -> web.Response:
        m = self.migrations.get(r.match_info["id"])
        if m is None:
            return web.json_response({"error": "no such migration"}, status=404)
        if m["phase"] in ("completed", "cancelled", "failed"):
            return web.json_response({"error": f"already {m['phase']}"}, status=409)
        m["phase"] = "cancelled"
        self.vms[m["vm"]]["state"] = "running"
        return web.json_response(self._public(r.match_info["id"]), status=202)

    async def register_with(self, session: ClientSession, coordinator: str, agent_token: str) -> None:
        async with session.post(f"{coordinator}/api/v1/hosts/register", json=self.registration(),
                                headers={"Authorization": f"Bearer {agent_token}"}) as resp:
            assert resp.status == 200, await resp.text()
            self.grant_key = (await resp.json())["grant_key"]


@contextlib.asynccontextmanager
async def serving(*fakes: FakeAgent) -> AsyncIterator[list[FakeAgent]]:
    """Serve each fake on loopback (``url`` set), peers of each other so migrations hand over."""
    servers: list[TestServer] = []
    try:
        for fake in fakes:
            server = TestServer(fake.app(), host="127.0.0.1")
            await server.start_server()
            servers.append(server)
            fake.url = str(server.make_url("")).rstrip("/")
        for fake in fakes:
            fake.peers = {other.url: other for other in fakes if other is not fake}
        yield list(fakes)
    finally:
        for server in servers:
            await server.close()


async def register_all(client: CoordinatorClient, fakes: list[FakeAgent], agent_token: str) -> None:
    for fake in fakes:
        fake.grant_key = (await client.register_host(fake.registration(), agent_token))["grant_key"]
