"""The Ansible rollout: playbook syntax, and configs it renders load cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from novacron import config, tls
from novacron.agent.config import AgentConfig
from novacron.agent.vm.images import check_image_dirs
from novacron.coordinator.config import CoordinatorConfig
from tests.conftest import REPO

ANSIBLE = REPO / "deploy" / "ansible"
BIN = Path(sys.executable).parent
SECRETS = {
    "novacron_cluster_secret": "cluster-secret-0123456789",
    "novacron_agent_api_token": "agent-api-token-0123456789",
    "novacron_admin_token": "admin-token-0123456789",
    "novacron_agent_token": "agent-token-0123456789",
    "novacron_agent_listen": "10.1.2.3",
    "novacron_database_url": "postgresql://nc:pw-0123456789@db1/novacron",
    "novacron_metrics_token": "metrics-token-0123456789",
}


def ansible(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = BIN / tool
    if not exe.exists():
        pytest.fail(f"{tool} is not installed in the venv (it comes with novacron[dev])")
    return subprocess.run([str(exe), *args], cwd=ANSIBLE, capture_output=True, text=True, timeout=120,
                          env={"PATH": f"{BIN}:/usr/bin:/bin", "ANSIBLE_LOCAL_TEMP": "/tmp/.ansible-tmp",
                               "HOME": "/tmp"})


def test_playbook_syntax() -> None:
    res = ansible("ansible-playbook", "--syntax-check", "site.yml")
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("role", "template", "schema"),
    [("novacron_agent", "agent.toml.j2", AgentConfig),
     ("novacron_coordinator", "coordinator.toml.j2", CoordinatorConfig)],
)
def test_rendered_config_loads(tmp_path: Path, role: str, template: str, schema: type) -> None:
    out = tmp_path / "rendered.toml"
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[coordinator]\ncoord1\n[agents]\nlocalhost ansible_connection=local\n")
    src = ANSIBLE / "roles" / role / "templates" / template
    extra = dict(SECRETS, inventory_hostname="kvm01", novacron_networks={"prod": "br-prod", "dev": "br0"})
    res = ansible(
        "ansible", "localhost", "-i", str(inventory), "-c", "local",
        "-e", f"@{ANSIBLE / 'group_vars' / 'all.yml'}", "-e", json.dumps(extra),
        "-m", "ansible.builtin.template", "-a", f"src={src} dest={out}",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = config.load(schema, path=out, env_prefix="UNUSED", environ={})
    if schema is AgentConfig:
        assert cfg.cluster_secret == SECRETS["novacron_cluster_secret"]
        assert cfg.host == "10.1.2.3" and cfg.name == "kvm01"
        assert cfg.coordinator_url == "https://coord1:7800"
        assert cfg.token == SECRETS["novacron_agent_api_token"]
        # images only from the image dir, beside (not inside) the agent's state dir; QEMU unprivileged
        assert cfg.image_dirs() == [Path("/var/lib/novacron/images")] and cfg.qemu_user == "novacron-qemu"
        assert check_image_dirs(cfg.image_dirs(), cfg.state_dir) == ""
        assert cfg.networks == {"prod": "br-prod", "dev": "br0"}
    else:
        assert cfg.admin_token == SECRETS["novacron_admin_token"]
        assert cfg.database_url == SECRETS["novacron_database_url"]
        assert cfg.metrics_token == SECRETS["novacron_metrics_token"]
    # TLS on, all three files, so the non-loopback listen address passes the daemons' check
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) == (
        "/etc/novacron/tls/host.crt", "/etc/novacron/tls/host.key", "/etc/novacron/tls/ca.crt")
    tls.check(cfg)


def test_each_agent_gets_its_own_api_token(tmp_path: Path) -> None:
    """Rendered for two hosts with the generated default, their tokens differ and persist."""
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[coordinator]\ncoord1\n[agents]\nkvm01\nkvm02\n")
    pki_dir = tmp_path / "pki"
    extra = {k: v for k, v in SECRETS.items() if k != "novacron_agent_api_token"}
    extra["novacron_pki_dir"] = str(pki_dir)
    tokens = {}
    for host in ("kvm01", "kvm02", "kvm01"):
        res = ansible("ansible", host, "-i", str(inventory), "-c", "local",
                      "-e", f"@{ANSIBLE / 'group_vars' / 'all.yml'}", "-e", json.dumps(extra),
                      "-m", "ansible.builtin.debug", "-a", "var=novacron_agent_api_token")
        assert res.returncode == 0, res.stdout + res.stderr
        token = json.loads(res.stdout.split("=>", 1)[1])["novacron_agent_api_token"]
        assert len(token) >= 16
        assert tokens.setdefault(host, token) == token  # stable across runs
    assert tokens["kvm01"] != tokens["kvm02"]
    assert {p.name for p in (pki_dir / "tokens").iterdir()} == {"kvm01", "kvm02"}


@pytest.mark.parametrize("unit", ["novacron_agent/templates/novacron-agent.service.j2",
                                  "novacron_coordinator/templates/novacron-coordinator.service.j2"])
def test_units_raise_the_descriptor_limit(unit: str) -> None:
    """At systemd's default of 1,024, 1,100 idle connections once starved /health."""
    lines = (ANSIBLE / "roles" / unit).read_text().splitlines()
    limits = [int(line.split("=", 1)[1]) for line in lines if line.startswith("LimitNOFILE=")]
    assert limits and limits[0] >= 65536


def test_system_package_list_is_shared() -> None:
    """The playbook installs the very list make uses, not a copy of it."""
    tasks = (ANSIBLE / "roles" / "novacron_base" / "tasks" / "main.yml").read_text()
    assert "'/tools/system-packages.txt'" in tasks
