"""A small Chrome DevTools Protocol client: Debian's headless ``chromium`` for browser tests.

The browser runs with a fresh profile in a temporary directory, talks only to the
pages a test opens (no sync, updates or background traffic), and is killed and its
profile removed on ``close()``, also when a test fails. Every wait is bounded.
Input goes through real input events (``Input.dispatchMouseEvent``,
``Input.insertText``), so the page sees what an operator's clicks and typing do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = "chromium"
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--no-default-browser-check",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
]


class BrowserError(RuntimeError):
    pass


def available() -> bool:
    return shutil.which(CHROMIUM) is not None


class Browser:
    """One headless Chromium and one page of it, driven over CDP."""

    def __init__(self, width: int = 1600, height: int = 1000) -> None:
        self.width, self.height = width, height
        self.profile = Path(tempfile.mkdtemp(prefix="nc-chromium-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.events: list[dict[str, Any]] = []  # every event the page sent, in order
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    async def start(self) -> Browser:
        log = (self.profile / "chromium.log").open("wb")
        try:
            self.proc = subprocess.Popen(
                [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}",
                 f"--window-size={self.width},{self.height}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        try:
            port = await self._port()
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S))
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t.get("type") == "page")
            self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20)
            self._reader = asyncio.create_task(self._read(), name="cdp-reader")
            for domain in ("Page", "Runtime", "Log", "Network"):
                await self.send(f"{domain}.enable")
            await self.send("Emulation.setDeviceMetricsOverride", {
                "width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            await self.close()
            raise
        return self

    async def _port(self) -> int:
        """Chromium writes the port it chose to DevToolsActivePort in the profile."""
        assert self.proc is not None
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(marker.read_text().splitlines()[0])
            await asyncio.sleep(0.05)
        raise BrowserError(f"chromium did not open its DevTools port in {START_TIMEOUT_S:.0f} s: "
                           f"{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.profile / "chromium.log").read_text(errors="replace")[-chars:]
        return ""

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            doc = json.loads(msg.data)
            if "id" in doc:
                fut = self._pending.pop(doc["id"], None)
                if fut is not None and not fut.done():
                    if "error" in doc:
                        fut.set_exception(BrowserError(f"{doc['error'].get('message')}: {doc['error']}"))
                    else:
                        fut.set_result(doc.get("result", {}))
            else:
                self.events.append(doc)
                for listener in list(self._listeners):
                    listener(doc)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrowserError("the DevTools connection closed"))

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   timeout: float = CALL_TIMEOUT_S) -> Any:
        if self._ws is None:
            raise BrowserError("not connected")
        msg_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(msg_id, None)

    # -- the page ----------------------------------------------------------------------------

    async def goto(self, url: str, timeout: float = 30.0) -> None:
        loaded = self.wait_event("Page.loadEventFired", timeout)
        await self.send("Page.navigate", {"url": url})
        await loaded

    def wait_event(self, method: str, timeout: float,
                   match: Callable[[dict[str, Any]], bool] = lambda _e: True) -> Awaitable[dict[str, Any]]:
        """Subscribe now; await the result later (so an event right after a call is not missed)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def listener(event: dict[str, Any]) -> None:
            if event.get("method") == method and not fut.done() and match(event.get("params", {})):
                fut.set_result(event.get("params", {}))

        self._listeners.append(listener)

        async def wait() -> dict[str, Any]:
            try:
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise BrowserError(f"no {method} within {timeout} s") from None
            finally:
                self._listeners.remove(listener)
        return wait()

    async def js(self, expression: str) -> Any:
        """Evaluate ``expression`` in the page (promises awaited); its JSON value."""
        res = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                   "awaitPromise": True})
        if "exceptionDetails" in res:
            details = res["exceptionDetails"]
            raise BrowserError(f"{expression[:200]!r} threw: "
                               f"{details.get('exception', {}).get('description') or details}")
        return res.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; its value. Raises after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = await self.js(expression)
            if last:
                return last
            if time.monotonic() > deadline:
                raise BrowserError(f"waited {timeout} s for {what or expression!r}; last value {last!r}")
            await asyncio.sleep(0.1)

    async def _center(self, selector: str) -> tuple[float, float]:
        box = await self.wait_for(
            f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
                 if (!e || e.disabled) return null;
                 e.scrollIntoView({{block: "center"}});
                 const r = e.getBoundingClientRect();
                 return r.width && r.height ? [r.x + r.width / 2, r.y + r.height / 2] : null; }})()""",
            what=f"a visible, enabled {selector}")
        return float(box[0]), float(box[1])

    async def click(self, selector: str) -> None:
        x, y = await self._center(selector)
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent",
                            {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    async def type(self, selector: str, text: str, *, clear: bool = True) -> None:
        await self.click(selector)
        if clear:
            await self.js(f"document.querySelector({json.dumps(selector)}).value = ''")
        await self.send("Input.insertText", {"text": text})

    async def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                       "windowsVirtualKeyCode": 13, "text": "\r"})

    async def select(self, selector: str, value: str) -> None:
        """Choose an option as a user would; the page gets its change event."""
        ok = await self.js(f"""(() => {{ const s = document.querySelector({json.dumps(selector)});
            if (![...s.options].some((o) => o.value === {json.dumps(value)} && !o.disabled)) return false;
            s.value = {json.dumps(value)}; s.dispatchEvent(new Event("change", {{bubbles: true}}));
            return true; }})()""")
        if not ok:
            raise BrowserError(f"{selector} has no enabled option {value!r}")

    async def text(self, selector: str) -> str:
        return str(await self.js(f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''"))

    async def screenshot(self, path: Path) -> Path:
        res = await self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(res["data"]))
        return path

    async def color_scheme(self, scheme: str) -> None:
        await self.send("Emulation.setEmulatedMedia",
                        {"features": [{"name": "prefers-color-scheme", "value": scheme}]})

    def exceptions(self) -> list[str]:
        """Uncaught script errors the page reported."""
        return [json.dumps(e["params"]["exceptionDetails"])[:500] for e in self.events
                if e.get("method") == "Runtime.exceptionThrown"]

    def requests(self) -> list[dict[str, Any]]:
        """Every request the page sent (url, method, headers)."""
        return [e["params"]["request"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def log_entries(self) -> list[dict[str, Any]]:
        return [e["params"]["entry"] for e in self.events if e.get("method") == "Log.entryAdded"]

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its renderer and helper processes too
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def __aenter__(self) -> Browser:
        return await self.start()

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()
