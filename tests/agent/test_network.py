"""Host networks: the [networks] mapping, refusals before anything starts, and real
taps (in a namespace this test creates) that vanish with their last descriptor."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from novacron import config
from novacron.agent.config import AgentConfig
from novacron.agent.main import check_config
from novacron.agent.vm.network import (
    ETH_P_RARP,
    HostNetworks,
    NetworkError,
    TapAnnouncer,
    check_mapping,
    rarp_frame,
)
from novacron.agent.vm.spec import SpecError, parse_spec
from tests.netns import inside, ip


def spec(*nets: str) -> object:
    return parse_spec({"name": "v", "vcpus": 1, "memory_mb": 128, "kernel": "k",
                       "nics": [{"net": n} for n in nets]})  # fmt: skip


def test_spec_naming_a_missing_network_is_refused() -> None:
    nets = HostNetworks({"prod": "br-prod"})
    nets.check(spec("prod"))  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"nics\[1\].net: this host has no network 'dev' \(it has: prod\)"):
        nets.check(spec("prod", "dev"))  # type: ignore[arg-type]
    assert nets.names == ["prod"]


def test_networks_setting_from_toml_and_environment(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('token = "t" \n[networks]\nprod = "br-prod"\ndev = "br0"\n')
    cfg = config.load(AgentConfig, path=toml, env_prefix="NOVACRON_AGENT", environ={})
    assert cfg.networks == {"prod": "br-prod", "dev": "br0"}
    cfg = config.load(AgentConfig, env_prefix="NOVACRON_AGENT",
                      environ={"NOVACRON_AGENT_NETWORKS": "prod=br-prod, dev=br0"})
    assert cfg.networks == {"prod": "br-prod", "dev": "br0"}
    with pytest.raises(config.ConfigError, match="name=value"):
        config.load(AgentConfig, env_prefix="NOVACRON_AGENT", environ={"NOVACRON_AGENT_NETWORKS": "prod"})
    toml.write_text('[networks]\nprod = 5\n')
    with pytest.raises(config.ConfigError, match="expected a string"):
        config.load(AgentConfig, path=toml, env_prefix="NOVACRON_AGENT", environ={})


@pytest.mark.parametrize("mapping, problem", [
    ({"Prod": "br0"}, "network names"),
    ({"prod": ""}, "not a Linux interface name"),
    ({"prod": "a-very-long-bridge-name"}, "not a Linux interface name"),
    ({"prod": "../etc"}, "not a Linux interface name"),
    ({"prod": "br 0"}, "not a Linux interface name"),
])  # fmt: skip
def test_bad_mappings_are_config_errors(mapping: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_mapping(mapping)
    cfg = AgentConfig(token="t" * 24, networks=mapping)
    with pytest.raises(config.Invalid, match=problem):
        check_config(cfg)


@pytest.fixture
def host_ns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    ns = f"nc-tap-{os.getpid()}-{secrets.token_hex(2)}"
    ip("netns", "add", ns)
    try:
        ip("link", "add", "br-prod", "type", "bridge", ns=ns)
        ip("link", "add", "notabridge", "type", "veth", "peer", "name", "nb-peer", ns=ns)
        yield ns
    finally:
        ip("netns", "del", ns)


def test_taps_join_the_bridge_and_vanish_with_their_descriptor(host_ns: str) -> None:
    nets = HostNetworks({"prod": "br-prod", "dev": "nosuchbr", "odd": "notabridge"})
    with inside(host_ns):
        assert nets.missing_bridges() == ["nosuchbr"]
        fds = nets.open_taps(spec("prod", "prod"))  # type: ignore[arg-type]
    try:
        on_bridge = ip("-o", "link", "show", "master", "br-prod", ns=host_ns)
        taps = [ln.split(":")[1].strip() for ln in on_bridge.splitlines()]
        assert len(taps) == 2 and all(t.startswith("nctap") for t in taps)
        assert all("UP" in ln for ln in on_bridge.splitlines())
    finally:
        for fd in fds:
            os.close(fd)
    assert ip("-o", "link", "show", "master", "br-prod", ns=host_ns).strip() == ""  # gone with the fds
    with inside(host_ns):
        with pytest.raises(NetworkError, match="bridge 'nosuchbr' does not exist"):
            nets.open_taps(spec("prod", "dev"))  # type: ignore[arg-type]
        with pytest.raises(NetworkError, match="notabridge"):
            nets.open_taps(spec("odd"))  # type: ignore[arg-type]
    # a failed second NIC leaves no tap from the first one behind
    assert "nctap" not in ip("-o", "link", "show", ns=host_ns)


def test_tap_announcer_puts_the_vms_rarp_on_the_bridge(host_ns: str) -> None:
    """What a migration destination does when the source pauses: one RARP from each
    NIC's MAC enters the bridge through the VM's tap (as QEMU's announce-self would
    from a running guest); the agent's duplicate keeps the tap only until closed."""
    mac = "52:54:00:12:34:56"
    ip("link", "set", "br-prod", "up", ns=host_ns)
    with inside(host_ns):
        (fd,) = HostNetworks({"prod": "br-prod"}).open_taps(spec("prod"))  # type: ignore[arg-type]
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_RARP))
    try:
        sniff.bind(("br-prod", ETH_P_RARP))
        sniff.settimeout(5)
        announcer = TapAnnouncer((fd,), [mac])
        os.close(fd)  # QEMU's copy gone: the announcer's keeps the tap
        assert "nctap" in ip("-o", "link", "show", "master", "br-prod", ns=host_ns)
        assert announcer.announce() == 1
        frame = sniff.recv(2048)
        assert frame[:42] == rarp_frame(mac)[:42]
        assert frame[:6] == b"\xff" * 6 and frame[6:12].hex(":") == mac and frame[12:14] == b"\x80\x35"
        announcer.close()
        assert ip("-o", "link", "show", "master", "br-prod", ns=host_ns).strip() == ""
        assert announcer.announce() == 0  # closed: nothing to write to
    finally:
        sniff.close()


@pytest.mark.e2e
async def test_tap_outlives_an_agent_restart_and_goes_with_the_vm() -> None:
    from novacron.agent.guest import ensure_guest
    from novacron.agent.local import LocalAgent
    from tests.netns import Fabric

    guest = ensure_guest()
    with Fabric(f"{os.getpid()}{secrets.token_hex(2)}") as net, inside(net.client):
        agent = LocalAgent("n", accel="tcg", netns=net.a, address=net.a_addr,
                           settings={"networks": f"prod={net.a_bridge}"})
        async with agent:
            status, vm = await agent.request("POST", "/v1/vms", {
                "name": "v", "vcpus": 1, "memory_mb": 128, "accel": "tcg", "kernel": str(guest.kernel),
                "initrd": str(guest.initrd), "cmdline": guest.workload_cmdline(), "nics": [{"net": "prod"}]})
            assert status == 201, vm
            (tap,) = net.taps(net.a)
            agent.kill()  # QEMU (and so its tap) lives on; the next agent adopts it
            await agent.start()
            status, again = await agent.request("GET", "/v1/vms/v")
            assert again["state"] == "running" and again["pid"] == vm["pid"]
            assert again["spec"]["nics"] == vm["spec"]["nics"] and net.taps(net.a) == [tap]
            assert (await agent.request("POST", "/v1/vms/v/stop?force=true"))[0] == 200  # booting: no acpid yet
            assert net.taps(net.a) == []  # gone with QEMU
