"""The web dashboard: served safely without a token, and calling only real API routes."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from novacron.coordinator.api.dashboard import ASSETS, load_files
from novacron.coordinator.api.keys import EVENTS, STORE
from novacron.coordinator.migrations import topic
from tests.coordinator.conftest import Coordinator
from tests.coordinator.fake_agent import FakeAgent
from tests.coordinator.test_api import GUEST, vm_spec

# call("GET", "/hosts", ...) / stream("GET", "/migrations/{id}/events", ...) in app.js
API_CALL = re.compile(r"""\b(call|stream)\(\s*"([A-Z]+)",\s*"(/[^"]*)\"""")

EXPECTED_CONTENT_TYPES = {"": "text/html", "/index.html": "text/html",
                          "/app.js": "text/javascript", "/style.css": "text/css"}


def app_js() -> str:
    return load_files()["app.js"].decode()


async def raw_get(c: Coordinator, path: str) -> tuple[int, bytes]:
    """Send ``path`` byte for byte (no client-side normalisation of '..' or escapes)."""
    assert c.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", c.server.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                     .encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_page_and_assets_are_served_with_security_headers(coordinator: Coordinator) -> None:
    for suffix, ctype in EXPECTED_CONTENT_TYPES.items():
        async with coordinator.session.get(coordinator.url + "/dashboard" + suffix) as resp:
            assert resp.status == 200, suffix
            assert resp.content_type == ctype, suffix
            assert resp.charset == "utf-8"
            csp = resp.headers["Content-Security-Policy"]
            assert "default-src 'self'" in csp and "script-src 'self'" in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            body = await resp.read()
            assert body == load_files()[suffix.lstrip("/") or "index.html"]
    async with coordinator.session.get(coordinator.url + "/", allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == "/dashboard"
    # The page itself carries no data: the API still wants a token.
    async with coordinator.session.get(coordinator.url + "/api/v1/hosts") as resp:
        assert resp.status == 401


def test_assets_are_self_contained_and_never_render_html() -> None:
    files = {name: body.decode() for name, body in load_files().items()}
    assert set(files) == set(ASSETS)
    for name, text in files.items():
        # no CDN, no web fonts: the machine has no internet
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), name
        assert "@import" not in text and "@font-face" not in text, name
    html = files["index.html"]
    assert '<script src="/dashboard/app.js"' in html and 'href="/dashboard/style.css"' in html
    assert "<script>" not in html and "style=" not in html  # the CSP forbids inline code
    js = files["app.js"]
    assert "innerHTML" not in js and "outerHTML" not in js and "eval(" not in js
    # the token is never logged or kept (state.console is the serial console view)
    assert not re.search(r"(?<![.\w])console\.\w+\(", js) and "localStorage" not in js
    assert js.count("fetch(") == 1  # every request goes through send(), with the header
    assert "new EventSource" not in js  # it cannot send the Authorization header


async def test_every_api_call_in_the_script_is_a_documented_route(
        coordinator: Coordinator) -> None:
    calls = {(method, path) for _fn, method, path in API_CALL.findall(app_js())}
    # The regex really finds the calls the dashboard is built on.
    assert {("GET", "/hosts"), ("GET", "/vms"), ("GET", "/migrations"),
            ("POST", "/migrations"), ("GET", "/migrations/{id}/events"),
            ("POST", "/placements"), ("POST", "/vms"), ("POST", "/vms/{name}/start"),
            ("POST", "/vms/{name}/stop"), ("PUT", "/hosts/{name}/maintenance"),
            ("GET", "/hosts/{name}/images"), ("GET", "/vms/{name}/console/log"),
            ("GET", "/audit")} <= calls
    # ... and no call is written in another form the regex would miss.
    assert len(re.findall(r"\b(?:call|stream)\(\s*\"", app_js())) == len(API_CALL.findall(app_js()))
    status, doc = await coordinator.call("GET", "/openapi.json")
    assert status == 200
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    missing = {(m, "/api/v1" + p) for m, p in calls} - documented
    # Routes a coordinator may not have yet: the script asks /openapi.json and shows their
    # controls only when they are listed (detectFeatures).
    optional = {(m, "/api/v1" + p) for m, p in OPTIONAL_ROUTES}
    for method, path in OPTIONAL_ROUTES:
        assert f'has("{method.lower()}", "{path}")' in app_js(), (method, path)
    missing -= optional
    assert not missing, f"app.js calls routes the API does not have: {sorted(missing)}"


OPTIONAL_ROUTES = {("POST", "/hosts/{name}/drain"), ("GET", "/drains/{id}"),
                   ("GET", "/migration-policies")}


async def test_images_and_console_pass_through_from_the_agent(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    alpha = agents[0]
    alpha.images = [{"name": "vmlinuz", "dir": "/srv/img", "size": 10},
                    {"name": "disks/web.qcow2", "dir": "/srv/img", "size": 2 << 30},
                    {"name": 7, "size": 1}, "junk", {"name": "no-size"}]
    status, doc = await coordinator.call("GET", "/hosts/alpha/images")
    assert status == 200, doc
    # what a spec may name, and its size; no host path, nothing malformed
    assert doc == {"host": "alpha", "images": [{"name": "vmlinuz", "size": 10},
                                               {"name": "disks/web.qcow2", "size": 2 << 30}]}
    assert (await coordinator.call("POST", "/vms", json=vm_spec("web", host="alpha")))[0] == 201
    alpha.serial["web"] = "Linux version 6.1\nlogin: "
    status, doc = await coordinator.call("GET", "/vms/web/console/log")
    assert status == 200 and doc == {"offset": 0, "next_offset": 25, "text": "Linux version 6.1\nlogin: "}
    status, doc = await coordinator.call("GET", "/vms/web/console/log?offset=6")
    assert status == 200 and doc["text"] == "version 6.1\nlogin: " and doc["next_offset"] == 25
    status, doc = await coordinator.call("POST", "/vms/web/console", json={"text": "uptime\n"})
    assert status == 200 and doc == {"sent": 7}
    assert alpha.serial["web"].endswith("login: uptime\n")


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("GET", "/hosts/nope/images", None, 404),
    ("GET", "/hosts/bad..name!/images", None, 400),
    ("GET", "/vms/nope/console/log", None, 404),
    ("GET", "/vms/web/console/log?offset=-1", None, 400),
    ("GET", "/vms/web/console/log?offset=x", None, 400),
    ("POST", "/vms/web/console", {"text": ""}, 400),
    ("POST", "/vms/web/console", {"text": "x" * 1025}, 400),
    ("POST", "/vms/web/console", {"text": "ls", "more": 1}, 400),
    ("POST", "/vms/nope/console", {"text": "ls"}, 404),
])
async def test_bad_image_and_console_requests_are_refused(
        coordinator: Coordinator, agents: list[FakeAgent], method: str, path: str,
        body: Any, status: int) -> None:
    assert (await coordinator.call("POST", "/vms", json=vm_spec("web", host="alpha")))[0] == 201
    got, doc = await coordinator.call(method, path, json=body)
    assert got == status and isinstance(doc.get("error"), str), doc
    assert agents[0].serial.get("web", "") == ""  # nothing was typed


async def test_images_of_a_down_host_are_a_clear_409(coordinator: Coordinator,
                                                     agents: list[FakeAgent]) -> None:
    await coordinator.server.app[STORE].mark_down(time.time() + 60)
    status, doc = await coordinator.call("GET", "/hosts/alpha/images")
    assert status == 409 and doc["error"] == "host 'alpha' is down; its images cannot be listed"


async def test_dashboard_is_not_an_api_route(coordinator: Coordinator) -> None:
    status, doc = await coordinator.call("GET", "/openapi.json")
    assert status == 200
    assert all(p.startswith("/api/v1/") for p in doc["paths"])
    assert not [p for p in doc["paths"] if "dashboard" in p]


@pytest.mark.parametrize("path", [
    "/dashboard/../config", "/dashboard/..%2fconfig", "/dashboard/%2e%2e/setup.py",
    "/dashboard/..%2F..%2Fsetup.py", "/dashboard/__init__.py", "/dashboard/dashboard.py",
    "/dashboard/app.js/..%2f__init__.py", "/dashboard/.%2fapp.js", "/dashboard/nope.js",
    "/dashboard/%2e%2e%2f%2e%2e%2fpyproject.toml", "/dashboard/app.js%00.html",
])
async def test_path_traversal_finds_nothing(coordinator: Coordinator, path: str) -> None:
    status, body = await raw_get(coordinator, path)
    assert status == 404, (path, body[:200])
    assert b"novacron" not in body.lower()  # no file content leaked


# Runs app.js under node with just enough of a browser to use its API helpers
# against the real coordinator: the SSE parser, the API's error messages, the
# progress arithmetic.
NODE_HARNESS = """
const [hBase, hToken, hMigId] = process.argv.slice(2);
const realFetch = globalThis.fetch;
globalThis.fetch = (u, init) => realFetch(hBase + u, init);
class FakeEl {
  constructor(tag) {
    Object.assign(this, { tagName: tag, children: [], textContent: "", className: "", value: "", dataset: {} });
    this.classList = { toggle: (name, on) => { this.className = on ? name : ""; }, add() {}, remove() {} };
  }
  append(...nodes) {
    for (const n of nodes) this.children.push(...(n.tagName === "#fragment" ? n.children : [n]));
  }
  replaceChildren(...nodes) { this.children = []; this.append(...nodes); }
  addEventListener() {}
}
globalThis.Node = FakeEl;
const byId = new Map();
globalThis.document = {
  hidden: false, addEventListener() {}, querySelectorAll: () => [],
  createElement: (tag) => new FakeEl(tag),
  createDocumentFragment: () => new FakeEl("#fragment"),
  getElementById(id) { if (!byId.has(id)) byId.set(id, new FakeEl("#" + id)); return byId.get(id); },
};
const text = (n) => n.children.length ? n.children.map(text).join(" ") : n.textContent;
const table = (id) => document.getElementById(id).children.map((tr) => tr.children.map(text));
globalThis.sessionStorage = { getItem: () => hToken, setItem() {}, removeItem() {} };
""" + "{APP_JS}" + """
(async () => {
  const events = [];
  const names = [];
  await stream("GET", "/migrations/{id}/events", { params: { id: hMigId } }, undefined,
               (name, data) => { names.push(name); events.push(JSON.parse(data)); });
  let refused = null;
  try { await call("POST", "/migrations", { body: { vm: "no-such-vm", target: "beta" } }); }
  catch (err) { refused = { status: err.status, message: err.message }; }
  const hosts = await call("GET", "/hosts");
  await refresh();
  document.getElementById("create-vcpus").value = "1";
  document.getElementById("create-memory").value = "128";
  await onPlace();
  const place = document.getElementById("create-result");
  process.stdout.write(JSON.stringify({
    names, phases: events.map((e) => e.phase), ids: events.map((e) => e.id),
    pct: events.map(progressPct), refused, hosts: hosts.hosts.map((h) => h.name),
    tables: { hosts: table("hosts"), vms: table("vms"), migrations: table("migrations"),
              audit: table("audit") },
    features: state.features,
    error: document.getElementById("error").textContent,
    place: { text: place.textContent, bad: place.className === "result bad" },
  }));
})().catch((err) => { process.stderr.write(String(err && err.stack)); process.exit(1); });
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_script_follows_a_live_migration(
        coordinator: Coordinator, agents: list[FakeAgent], tmp_path: Path) -> None:
    alpha = agents[0]
    assert (await coordinator.call("POST", "/vms", json=vm_spec("web")))[0] == 201
    alpha.hold_migrations = True  # still in pre-copy when the script starts following
    status, mig = await coordinator.call("POST", "/migrations", json={"vm": "web", "target": "beta"})
    assert status == 202, mig
    harness = tmp_path / "harness.js"
    harness.write_text(NODE_HARNESS.replace("{APP_JS}", app_js()))
    proc = await asyncio.create_subprocess_exec(
        "node", str(harness), coordinator.url, coordinator.cfg.admin_token, mig["id"],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(100):  # bounded: the stream shows pre-copy before we release it
            await asyncio.sleep(0.05)
            if (await coordinator.call("GET", f"/migrations/{mig['id']}"))[1]["phase"] == "precopy":
                break
        subs = coordinator.server.app[EVENTS]._subs  # the script's stream is subscribed
        for _ in range(400):  # bounded: node starts slowly on a busy machine
            if subs.get(topic(mig["id"])):
                break
            await asyncio.sleep(0.05)
        alpha.hold_migrations = False
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = json.loads(out)
    assert set(result["names"]) == {"migration"}
    assert set(result["ids"]) == {mig["id"]}
    assert result["phases"][-1] == "completed" and "precopy" in result["phases"]
    pct = result["pct"]
    assert all(isinstance(p, (int, float)) and 0 <= p <= 100 for p in pct), pct
    assert pct == sorted(pct) and pct[-1] == 100
    # The API's own message reaches the operator.
    status, doc = await coordinator.call("POST", "/migrations",
                                         json={"vm": "no-such-vm", "target": "beta"})
    assert result["refused"] == {"status": status, "message": doc["error"]}
    assert sorted(result["hosts"]) == ["alpha", "beta"]
    # refresh() rendered the fleet as the API reports it.
    tables = result["tables"]
    assert result["error"] == ""
    assert sorted(row[0] for row in tables["hosts"]) == ["alpha", "beta"]
    beta_row = next(row for row in tables["hosts"] if row[0] == "beta")
    assert beta_row[1] == "up" and beta_row[6] == "1" and beta_row[8] == "Maintenance Drain…"
    [vm_row] = tables["vms"]
    assert vm_row[:7] == ["web", "beta", "running", "1", "256 MiB",
                          f"{GUEST['kernel']} + {GUEST['initrd']}", ""]
    assert vm_row[7] == "Stop Migrate… Console"
    [mig_row] = tables["migrations"]
    # id, VM, route, policy, phase, progress, sent, remaining, rate, ETA, downtime, time
    assert mig_row[:6] == [mig["id"], "web", "alpha → beta", "—", "completed", "done"]
    assert mig_row[6] == "5.9 KiB"  # 6 steps x 1000 wire bytes
    assert mig_row[7] == "0 B" and mig_row[8:10] == ["—", "—"]
    assert mig_row[10] == "12.5 ms" and mig_row[11] == "0.1 s"
    # the audit trail lists what was done, newest first
    assert any(row[2] == "POST /api/v1/migrations" and row[3] == "web -> beta" for row in tables["audit"])
    assert result["features"] == {"drain": True, "policies": True, "images": True,
                                  "console": True, "checked": True}
    # The dry-run placement shows the scheduler's choice and why.
    status, placed = await coordinator.call("POST", "/placements",
                                            json={"vm": {"vcpus": 1, "memory_mb": 128}})
    assert status == 200 and placed["placed"]
    assert not result["place"]["bad"]
    assert result["place"]["text"].startswith(f"→ {placed['host']}\n")
    assert placed["explanation"]["why"] in result["place"]["text"]
