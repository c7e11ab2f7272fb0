"""Real ``novacron-agent`` processes on loopback, for tests, the demo and benchmarks.

    async with LocalAgent(name="a") as agent:
        agent.url, agent.token, agent.data_port, agent.state_dir

Each agent gets a temp state dir (on /dev/shm when that is a roomy tmpfs, so
guest RAM files live in memory as on a real host), a random token and cluster secret (or the
ones given, e.g. a shared secret for two agents that must migrate between each
other), an API port chosen by the kernel and, unless given, a free data port.
Its image dirs are the test guest's cache folder (``agent.guest.cache_root()``)
unless ``image_dirs`` says otherwise, so specs may name the test guest's files.
They trust this process's grant key (``grant_to`` signs a migration grant with
it) until a coordinator gives them its own; ``tls`` (a host certificate from
``novacron.pki``) makes the API HTTPS with mutual TLS.
``stop()`` ends the agent and every QEMU it started; ``kill()`` SIGKILLs the
agent alone (fault tests) and leaves the clean-up to ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from novacron.agent.daemon import ENDPOINT_FILE
from novacron.agent.guest import cache_root
from novacron.agent.vm.ramfile import filesystem_type, free_bytes
from novacron.agent.vm.recovery import qemus_under
from novacron.grants import GrantSigner
from novacron.pki import IssuedFiles
from novacron.tls import client_context

START_TIMEOUT_S = 60.0  # the first start on a host may probe KVM (a few seconds)
STOP_TIMEOUT_S = 20.0
SHM_MIN_FREE = 4 * 1024**3


class LocalAgentError(RuntimeError):
    pass


def _agent_command() -> list[str]:
    script = Path(sys.executable).parent / "novacron-agent"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "novacron.agent.main"]


def state_parent() -> str | None:
    """/dev/shm when it is a roomy tmpfs (guest RAM files belong in memory, as on a
    real host), else the default temp dir."""
    shm = Path("/dev/shm")
    try:
        if filesystem_type(shm) == "tmpfs" and free_bytes(shm) >= SHM_MIN_FREE:
            return str(shm)
    except OSError:
        pass
    return None


_LOCAL_GRANTS: list[GrantSigner] = []


def local_grants() -> GrantSigner:
    """This process's grant key: local agents trust it until a coordinator gives them its own."""
    if not _LOCAL_GRANTS:
        _LOCAL_GRANTS.append(GrantSigner.generate())
    return _LOCAL_GRANTS[0]


def _proc_cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


class LocalAgent:
    def __init__(
        self,
        name: str = "",
        *,
        token: str | None = None,
        cluster_secret: str | None = None,
        state_dir: Path | None = None,
        data_port: int = 0,
        accel: str = "auto",
        settings: dict[str, str] | None = None,
        image_dirs: list[Path] | None = None,
        env: dict[str, str] | None = None,
        tls: IssuedFiles | None = None,
        netns: str = "",
        address: str = "127.0.0.1",
        own_session: bool = False,
    ) -> None:
        self.name = name or f"agent-{secrets.token_hex(3)}"
        self.token = token or secrets.token_urlsafe(24)
        self.cluster_secret = cluster_secret or secrets.token_urlsafe(32)
        self._own_state_dir = state_dir is None
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix=f"nc-{self.name}-", dir=state_parent()))
        self._requested_data_port = data_port
        self.data_port = data_port
        self.accel = accel
        self.settings = dict(settings or {})  # extra NOVACRON_AGENT_* settings, e.g. {"log_level": "debug"}
        self.image_dirs = image_dirs if image_dirs is not None else [cache_root()]
        self.env = dict(env or {})  # extra environment, e.g. {"NOVACRON_CRASH_AT": "vm.create.spawned"}
        self.tls = tls  # this host's certificate from a fleet CA: HTTPS with mutual TLS
        # a test "host": run inside this network namespace (``ip netns exec``), API and
        # migration channel on ``address`` there (plain HTTP off loopback needs insecure)
        self.netns = netns
        self.address = address
        # its own session, hence its own scheduler autogroup (as each QEMU has, and as an
        # agent on a real host, a service of its own, has its cgroup): without it, two
        # agents and their caller share one fair share of the CPU on a busy machine.
        # A terminal's Ctrl-C then reaches only the caller, whose stop() ends the agent.
        self.own_session = own_session
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.state_dir / "agent.log"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}:{self.port}"

    def client_ssl(self) -> ssl.SSLContext | bool:
        """How to call this agent: the fleet CA and this host's own (CA-signed) certificate."""
        if self.tls is None:
            return True
        return client_context(str(self.tls.ca), str(self.tls.cert), str(self.tls.key))

    def grant_to(self, dest: LocalAgent, vm: str, *, data_port: int | None = None,
                 url: str | None = None) -> str:
        """A grant for ``vm`` to move from here to ``dest``, signed with the local grant
        key these agents trust (what a coordinator issues from its registry)."""
        return local_grants().issue(
            migration="local-" + secrets.token_hex(4), vm=vm, source=self.name, target=dest.name,
            url=url or dest.url, data_host=dest.address, data_port=data_port or dest.data_port)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOVACRON")}
        values = {
            "host": self.address,
            "port": "0",
            "data_port": str(self._requested_data_port),
            "state_dir": str(self.state_dir),
            "token": self.token,
            "cluster_secret": self.cluster_secret,
            "name": self.name,
            "vms_on_exit": "stop",
            "accel": self.accel,
            "images_dirs": ",".join(str(d) for d in self.image_dirs),
            "grant_key": local_grants().public_key,  # replaced by a coordinator's on registering
            **self.settings,
        }
        if self.address != "127.0.0.1" and self.tls is None:
            values.setdefault("insecure", "true")
        if self.tls is not None:
            values.update(tls_cert=str(self.tls.cert), tls_key=str(self.tls.key), tls_ca=str(self.tls.ca))
        env.update({f"NOVACRON_AGENT_{k.upper()}": v for k, v in values.items()})
        env.update(self.env)
        return env

    async def start(self, timeout: float = START_TIMEOUT_S) -> LocalAgent:
        if self.proc is not None and self.proc.poll() is None:
            raise LocalAgentError(f"agent {self.name} is running already")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for folder in self.image_dirs:
            folder.mkdir(parents=True, exist_ok=True)
        empty_config = self.state_dir / "agent.toml"
        empty_config.write_text("# settings come from NOVACRON_AGENT_* (LocalAgent)\n")
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / ENDPOINT_FILE).unlink()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*(["ip", "netns", "exec", self.netns] if self.netns else []), *_agent_command(),
                 "--config", str(empty_config)],
                env=self._env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=self.own_session,
            )  # fmt: skip
        try:
            await self._wait_ready(timeout)
        except BaseException:
            await self.stop()  # the error message carries the log's tail
            raise
        return self

    async def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        endpoint = self.state_dir / ENDPOINT_FILE
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:
                if self.proc.poll() is not None:
                    raise LocalAgentError(f"agent {self.name} exited ({self.proc.returncode}): {self.log_tail()}")
                if time.monotonic() > deadline:
                    raise LocalAgentError(f"agent {self.name} not ready in {timeout:.0f}s: {self.log_tail()}")
                info = self._read_endpoint(endpoint)
                if info is not None:
                    self.port, self.data_port = int(info["port"]), int(info["data_port"])
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(f"{self.url}/v1/health", ssl=self.client_ssl()) as resp:
                            if resp.status == 200:
                                return
                await asyncio.sleep(0.05)

    def _read_endpoint(self, path: Path) -> dict[str, Any] | None:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or self.proc is None or info.get("pid") != self.proc.pid:
            return None
        return info

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the agent only (its QEMUs live on until stop())."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def stop(self, timeout: float = STOP_TIMEOUT_S, *, remove: bool = True) -> None:
        """Stop the agent (it powers its VMs off), kill any QEMU left, remove a temp state dir."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self.kill_leftover_qemus()
        if remove and self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def qemu_pids(self) -> list[int]:
        """QEMU processes running in one of this agent's VM folders (found by their
        working directory: a record may predate its QEMU's spawn)."""
        pids: list[int] = []
        for sub in ("vms", "incoming"):
            for procs in qemus_under(self.state_dir / sub).values():
                pids += [p.pid for p in procs]
        return sorted(pids)

    def kill_leftover_qemus(self, timeout: float = 10.0) -> None:
        """SIGKILL them and wait (bounded) until they are really gone."""
        pidfds = []
        for pid in self.qemu_pids():
            with contextlib.suppress(OSError):
                pidfds.append(os.pidfd_open(pid))
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        for fd in pidfds:
            with contextlib.suppress(OSError):
                select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            os.close(fd)

    async def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
        """One authenticated API call; returns (status, decoded JSON body)."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.request(method, self.url + path, json=body, headers=self.headers,
                            ssl=self.client_ssl()) as resp,
        ):
            return resp.status, await resp.json(content_type=None)

    async def __aenter__(self) -> LocalAgent:
        return await self.start()

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()
