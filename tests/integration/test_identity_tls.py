"""Issue 11: one identity per host, TLS off loopback, grants instead of forwarded
tokens, no SSRF through the agent API. Real daemons on loopback, real TLS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from novacron import pki
from novacron.agent.channel import AuthError, ChannelClosed, connect
from novacron.agent.local import LocalAgent, local_grants
from novacron.cli.main import main as cli_main
from novacron.coordinator.client import CoordinatorClient
from novacron.coordinator.local import LocalCoordinator
from novacron.grants import GrantSigner, GrantVerifier
from novacron.tls import client_context


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    pki.init_ca(d)
    return d


def issue(d: Path, name: str) -> pki.IssuedFiles:
    return pki.issue(d, name, ["127.0.0.1", "localhost"])


# -- the CA and host certificates -------------------------------------------------------


def test_pki_cli_makes_a_ca_and_distinct_host_certificates(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    assert cli_main(["pki", "init", "--dir", str(d)]) == 0
    assert cli_main(["pki", "init", "--dir", str(d)]) == 1  # never replaces a CA
    for host in ("kvm01", "kvm02"):
        assert cli_main(["pki", "issue", "--dir", str(d), "--name", host, "--san", "10.0.0.7"]) == 0
    assert cli_main(["pki", "issue", "--dir", str(d), "--name", "kvm01"]) == 1  # exists
    assert cli_main(["pki", "issue", "--dir", str(d), "--name", "bad/name"]) == 1
    assert "exists already" in capsys.readouterr().err
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    certs = [x509.load_pem_x509_certificate((d / f"{h}.crt").read_bytes()) for h in ("kvm01", "kvm02")]
    for host, cert in zip(("kvm01", "kvm02"), certs, strict=True):
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == host
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,  # type: ignore[call-arg]
                               ec.ECDSA(cert.signature_hash_algorithm))  # type: ignore[arg-type]
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        assert 300 < days < 400
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert host in san.get_values_for_type(x509.DNSName)
        assert stat.S_IMODE((d / f"{host}.key").stat().st_mode) == 0o600
    assert certs[0].public_key() != certs[1].public_key()
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600


# -- plain HTTP only on loopback ----------------------------------------------------------


@pytest.mark.parametrize("daemon", ["novacron.agent.main", "novacron.coordinator.main"])
def test_non_loopback_listen_without_tls_is_refused(tmp_path: Path, daemon: str,
                                                    script_env: dict[str, str]) -> None:
    env = dict(script_env, NOVACRON_AGENT_TOKEN="agent-api-token-0123456789",
               NOVACRON_COORDINATOR_ADMIN_TOKEN="admin-token-0123456789",
               NOVACRON_COORDINATOR_AGENT_TOKEN="agent-token-0123456789",
               NOVACRON_AGENT_STATE_DIR=str(tmp_path / "a"),
               NOVACRON_COORDINATOR_DATA_DIR=str(tmp_path / "c"))
    res = subprocess.run([sys.executable, "-m", daemon, "--config", "/dev/null", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "without TLS" in lines[0] and "--insecure" in lines[0], res.stderr
    # The operator's explicit --insecure passes the check (not started: tests stay on loopback).
    from novacron.agent.main import DAEMON as AGENT
    from novacron.coordinator.main import DAEMON as COORD

    module = AGENT if daemon.startswith("novacron.agent") else COORD
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert module.load(["--config", "/dev/null", "--host", "0.0.0.0", "--insecure"]).insecure  # type: ignore[attr-defined]


# -- real daemons over TLS ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def tls_fleet(tmp_path: Path, fleet: Path, *names: str,
                    accel: str = "tcg") -> AsyncIterator[tuple[LocalCoordinator, list[LocalAgent]]]:
    coord = LocalCoordinator(tmp_path / "coord", tls=issue(fleet, "coordinator"),
                             settings={"heartbeat_interval_s": "0.3", "poll_interval_s": "0.1"})
    agents = [LocalAgent(n, accel=accel, tls=issue(fleet, n), cluster_secret="fleet-secret-" + "x" * 20)
              for n in names]
    try:
        await coord.start()
        assert coord.url.startswith("https://")
        for a in agents:
            a.settings.update(coordinator_url=coord.url, coordinator_token=coord.agent_token)
        await asyncio.gather(*(a.start() for a in agents))
        async with CoordinatorClient(coord.url, coord.admin_token, ssl=coord.client_ssl()) as c:
            for _ in range(200):  # bounded: ~20 s
                hosts = {h["name"]: h for h in await c.hosts()}
                if all(n in hosts and hosts[n]["last_heartbeat"] > hosts[n]["registered_at"]
                       for n in names):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"agents did not register and heartbeat over mTLS: {hosts}")
        yield coord, agents
    finally:
        await asyncio.gather(*(a.stop() for a in agents))
        coord.stop()


async def _get(url: str, ssl_ctx: ssl.SSLContext | bool, **kw: Any) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, \
            s.request(kw.pop("method", "GET"), url, ssl=ssl_ctx, **kw) as resp:
        return resp.status


async def _refused(url: str, ssl_ctx: ssl.SSLContext | bool, **kw: Any) -> str:
    """The request must fail in the TLS layer (handshake refused or server unverified)."""
    with pytest.raises((aiohttp.ClientConnectionError, ssl.SSLError)) as info:
        await _get(url, ssl_ctx, **kw)
    return str(info.value)


@pytest.mark.slow
async def test_clients_without_a_fleet_certificate_are_refused(tmp_path: Path, fleet: Path) -> None:
    stranger_dir = tmp_path / "stranger"
    pki.init_ca(stranger_dir, name="not the fleet CA")
    stranger = issue(stranger_dir, "reg-a")  # same name, wrong CA
    async with tls_fleet(tmp_path, fleet, "reg-a") as (coord, (agent,)):
        ca = str(agent.tls.ca) if agent.tls else ""
        # Agent: no client certificate, a certificate from another CA, plain HTTP: all refused.
        await _refused(agent.url + "/v1/health", client_context(ca))
        await _refused(agent.url + "/v1/host", client_context(ca, str(stranger.cert), str(stranger.key)),
                       headers=agent.headers)
        await _refused(agent.url.replace("https", "http") + "/v1/health", True)
        assert await _get(agent.url + "/v1/host", agent.client_ssl(), headers=agent.headers) == 200
        # Coordinator: a foreign certificate fails the handshake; without one the host routes
        # refuse even the right bootstrap token; the CLI must verify the server.
        reg = {"name": "reg-a", "url": agent.url, "token": "x" * 32, "cpus": 1,
               "memory_bytes": 1 << 30, "memory_available_bytes": 1 << 29}
        auth = {"Authorization": f"Bearer {coord.agent_token}"}
        await _refused(coord.url + "/api/v1/hosts/register",
                       client_context(ca, str(stranger.cert), str(stranger.key)),
                       method="POST", json=reg, headers=auth)
        assert await _get(coord.url + "/api/v1/hosts/register", client_context(ca),
                          method="POST", json=reg, headers=auth) == 401
        assert "CERTIFICATE_VERIFY_FAILED" in await _refused(coord.url + "/api/v1/health", True)
        # Another fleet host (own CA-signed certificate) cannot take the name over.
        other = issue(fleet, "other-host")
        other_ssl = client_context(ca, str(other.cert), str(other.key))
        assert await _get(coord.url + "/api/v1/hosts/register", other_ssl, method="POST",
                          json=dict(reg, url="https://127.0.0.1:9"), headers=auth) == 403
        assert await _get(coord.url + "/api/v1/hosts/reg-a/heartbeat", other_ssl, method="POST",
                          json={"memory_available_bytes": 1}, headers=auth) == 403
        async with CoordinatorClient(coord.url, coord.admin_token, ssl=coord.client_ssl()) as c:
            host = next(h for h in await c.hosts() if h["name"] == "reg-a")
            assert host["url"] == agent.url and host["state"] == "up"
            beat = host["last_heartbeat"]
            for _ in range(50):  # the original keeps heartbeating
                await asyncio.sleep(0.1)
                if next(h for h in await c.hosts() if h["name"] == "reg-a")["last_heartbeat"] > beat:
                    break
            else:
                raise AssertionError("the original agent's heartbeats stopped")
        # A host certificate registers only its own name (a free name included), so a name
        # cannot point the coordinator at another host's agent.
        assert await _get(coord.url + "/api/v1/hosts/register", other_ssl, method="POST",
                          json=dict(reg, name="imp", url=agent.url), headers=auth) == 403
        async with CoordinatorClient(coord.url, coord.admin_token, ssl=coord.client_ssl()) as c:
            assert "imp" not in [h["name"] for h in await c.hosts()]
        log = coord.log_path.read_text()
        assert "bound to another identity" in log and "127.0.0.1" in log and "cert:other-host" in log
        # The CLI verifies the coordinator with --ca, and refuses it without.
        env = {"NOVACRON_TOKEN": coord.admin_token, "PATH": "/usr/bin:/bin"}
        run = [sys.executable, "-m", "novacron.cli.main", "--server", coord.url, "hosts", "--json"]
        ok = subprocess.run([*run[:3], "--ca", ca, *run[3:]], capture_output=True, text=True,
                            timeout=60, env=env)
        assert ok.returncode == 0 and "reg-a" in ok.stdout, ok.stderr
        bad = subprocess.run(run, capture_output=True, text=True, timeout=60, env=env)
        assert bad.returncode == 1 and "certificate verify failed" in bad.stderr.lower(), bad.stderr


@pytest.mark.e2e
@pytest.mark.slow
async def test_migration_between_agents_over_mutual_tls(tmp_path: Path, fleet: Path) -> None:
    from tests.migration.agents import Api
    from tests.migration.qemu_helpers import guest_spec

    stranger_dir = tmp_path / "stranger"
    pki.init_ca(stranger_dir, name="not the fleet CA")
    stranger = issue(stranger_dir, "tls-a")  # the source's name, from another CA
    other = issue(fleet, "tls-c")  # a fleet host that is neither side of the migration
    async with tls_fleet(tmp_path, fleet, "tls-a", "tls-b") as (coord, (a, b)):
        assert a.tls is not None and b.tls is not None
        ca, secret = str(b.tls.ca), b.cluster_secret

        def as_host(files: pki.IssuedFiles) -> ssl.SSLContext:
            return client_context(ca, str(files.cert), str(files.key))

        # The data port is mutual TLS: the cluster secret alone (plain TCP), a certificate
        # from another CA, or the wrong host name for the destination all fail.
        with pytest.raises(AuthError):
            await connect("127.0.0.1", b.data_port, secret, timeout=10)
        await _channel_refused(b.data_port, secret, as_host(stranger), "tls-b")
        with pytest.raises(AuthError, match="not valid for 'tls-a'"):  # b's certificate is not tls-a's
            await connect("127.0.0.1", b.data_port, secret, ssl=as_host(a.tls), server_name="tls-a",
                          timeout=10)
        async with CoordinatorClient(coord.url, coord.admin_token, ssl=coord.client_ssl()) as c:
            await c.create_vm({**guest_spec("tlsvm"), "host": "tls-a"})
            await Api(a).wait_console("tlsvm", r"NOVACRON-HB .* ok=1", timeout=150)
            mig = await c.migrate("tlsvm", "tls-b", {"downtime_ms": 300})
            for _ in range(1200):  # bounded: 120 s
                mig = await c.migration(mig["id"])
                if mig["phase"] in ("completed", "failed", "cancelled"):
                    break
                await asyncio.sleep(0.1)
            assert mig["phase"] == "completed", mig
            assert (await c.vm("tlsvm"))["host"] == "tls-b"
        assert (await b.request("GET", "/v1/vms/tlsvm"))[1]["state"] == "running"
        assert (await a.request("GET", "/v1/vms/tlsvm"))[0] == 404
        await Api(b).wait_console("tlsvm", r"NOVACRON-HB .* ok=1", timeout=30)
        # What became of the migration is told to its source only (its certificate's name
        # is the one b journalled), not to another fleet host.
        query = {"op": "query", "id": mig["id"], "vm": "tlsvm"}
        assert (await _ask(b.data_port, secret, as_host(a.tls), query)) == {"op": "outcome",
                                                                           "outcome": "committed"}
        refused = await _ask(b.data_port, secret, as_host(other), query)
        assert refused.get("op") == "error" and "tls-c" in refused["reason"], refused
        # Neither agent ever saw the other's token.
        assert b.token not in a.log_path.read_text() and a.token not in b.log_path.read_text()


async def _channel_refused(port: int, secret: str, ctx: ssl.SSLContext, name: str) -> None:
    """The TLS layer must end the connection: at the handshake, or (TLS 1.3: the client
    certificate is checked after the client's handshake finished) at the first read."""
    with pytest.raises((AuthError, ChannelClosed, OSError)):
        ch = await connect("127.0.0.1", port, secret, ssl=ctx, server_name=name, timeout=10)
        try:
            await ch.recv(timeout=10)
        finally:
            await ch.close()


async def _ask(port: int, secret: str, ctx: ssl.SSLContext, msg: dict[str, Any]) -> dict[str, Any]:
    """One control message to the destination's data port as the host of ``ctx``; its answer."""
    ch = await connect("127.0.0.1", port, secret, ssl=ctx, server_name="tls-b", timeout=10)
    try:
        await ch.send_ctrl(msg, timeout=10)
        rec = await ch.recv(timeout=10)
    finally:
        await ch.close()
    return dict(rec.ctrl or {})


# -- no SSRF through the agent API, and the destination checks the grant ------------------


def tamper(grant: str, **changes: Any) -> str:
    """The grant with its payload edited and the original signature kept."""
    head, payload, sig = grant.split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    doc.update(changes)
    edited = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    return f"{head}.{edited}.{sig}"


class Listener:
    """Some other local service; it must never hear from the agent."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        async def on(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            w.close()

        self.server = await asyncio.start_server(on, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.slow
async def test_agent_refuses_unauthorised_targets_and_grants(tmp_path: Path) -> None:
    secret = "ssrf-cluster-secret-0123456789"
    async with Listener() as other, LocalAgent("ssrf-a", accel="tcg", cluster_secret=secret) as a, \
            LocalAgent("ssrf-b", accel="tcg", cluster_secret=secret) as b:
        there = f"http://127.0.0.1:{other.port}"
        attacker = GrantSigner.generate()
        forged = attacker.issue(migration="m-x", vm="v", source="ssrf-a", target="ssrf-b", url=there,
                                data_host="127.0.0.1", data_port=other.port)
        cases = [
            ({"vm": "v", "target": {"url": there, "token": b.token}}, 400, "'grant'"),
            ({"vm": "v", "grant": a.grant_to(b, "v"), "target": {"url": there}}, 403, "not the destination"),
            ({"vm": "v", "grant": forged}, 403, "signature"),
            ({"vm": "v", "grant": tamper(a.grant_to(b, "v"), url=there, data_port=other.port)},
             403, "signature"),
        ]
        for body, want, words in cases:
            status, doc = await a.request("POST", "/v1/migrations", body)
            assert status == want and words in doc["error"], (body, status, doc)
        await asyncio.sleep(0.2)
        assert other.connections == 0
        assert (await a.request("GET", "/v1/migrations"))[1] == {"migrations": []}

        # The destination admits an incoming channel only with a grant naming it, once.
        async def offer(grant: str, *, then_prepare: bool = False) -> str:
            ch = await connect("127.0.0.1", b.data_port, secret)
            try:
                await ch.send_ctrl({"op": "grant", "grant": grant})
                if then_prepare:  # past admission: a protocol error
                    await ch.send_ctrl({"op": "prepare", "id": "!"})
                # a refused grant is answered at once (nothing more is sent: writing to a
                # channel the destination already closed could reset it before we read why)
                rec = await ch.recv(timeout=10)
                return str((rec.ctrl or {}).get("reason"))
            finally:
                with contextlib.suppress(ChannelClosed):
                    await ch.close()

        good = a.grant_to(b, "v")
        assert "bad migration id" in await offer(good, then_prepare=True)
        assert "used already" in await offer(good)
        assert "signature" in await offer(forged)
        assert "destination 'ssrf-a'" in await offer(b.grant_to(a, "v"))
        # A grant lets its source read that migration's outcome there, nothing else.
        probe = {"Authorization": f"Grant {good}"}
        async with aiohttp.ClientSession() as s:
            for path, want in [("/v1/vms/v", 404), ("/v1/vms/other", 401), ("/v1/host", 401),
                               ("/v1/migrations/none", 401),  # not the granted migration
                               (f"/v1/migrations/{GrantVerifier(local_grants().public_key).verify(good).migration}",
                                404)]:
                async with s.get(b.url + path, headers=probe) as resp:
                    assert resp.status == want, (path, resp.status)
            async with s.delete(b.url + "/v1/vms/v", headers=probe) as resp:
                assert resp.status == 401
