"""Run a real ``novacron-coordinator`` subprocess on loopback (demo, tests, benchmarks).

It listens on a free port (port 0; the URL is read back from the
``listen.json`` the service writes) with fresh random tokens and its own data
directory. ``stop()`` ends it with SIGTERM (SIGKILL if it lingers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from novacron import logs
from novacron.pki import IssuedFiles
from novacron.tls import client_context


class CoordinatorStartError(RuntimeError):
    pass


class LocalCoordinator:
    def __init__(self, data_dir: Path, *, admin_token: str | None = None,
                 agent_token: str | None = None, settings: dict[str, str] | None = None,
                 env: dict[str, str] | None = None,
                 tls: IssuedFiles | None = None) -> None:
        self.data_dir = data_dir
        self.admin_token = admin_token or "adm-" + secrets.token_urlsafe(24)
        self.agent_token = agent_token or "agt-" + secrets.token_urlsafe(24)
        logs.register_secret(self.admin_token)
        logs.register_secret(self.agent_token)
        self.settings = settings or {}
        self.extra_env = dict(env or {})  # e.g. {"NOVACRON_CRASH_AT": "migration.start.accepted"}
        self.tls = tls  # its certificate from a fleet CA: HTTPS, agents identified by theirs
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "coordinator.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOVACRON_COORDINATOR")}
        values = {"host": "127.0.0.1", "port": "0", "data_dir": str(self.data_dir),
                  "admin_token": self.admin_token, "agent_token": self.agent_token,
                  "log_level": "info", **self.settings}
        if self.tls is not None:
            values.update(tls_cert=str(self.tls.cert), tls_key=str(self.tls.key),
                          tls_ca=str(self.tls.ca))
        env.update({f"NOVACRON_COORDINATOR_{k.upper()}": v for k, v in values.items()})
        env.update(self.extra_env)
        return env

    async def start(self, timeout_s: float = 30.0) -> LocalCoordinator:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        listen = self.data_dir / "listen.json"
        listen.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "novacron.coordinator.main"], env=self.env(),
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal is handled by our owner
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise CoordinatorStartError(
                    f"coordinator exited with {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(FileNotFoundError, ValueError):
                doc = json.loads(listen.read_text())
                if doc.get("pid") == self.proc.pid:
                    self.url = str(doc["url"])
                    return self
            await asyncio.sleep(0.05)
        self.kill()
        raise CoordinatorStartError(f"coordinator did not start within {timeout_s:.0f} s")

    def client_ssl(self) -> ssl.SSLContext | None:
        """What an operator's client (the CLI) uses: trust the fleet CA, no certificate."""
        return client_context(str(self.tls.ca)) if self.tls is not None else None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def __aenter__(self) -> LocalCoordinator:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.stop()
