"""QEMU confined, on a real guest: seccomp sandbox on and, when the agent runs as
root, QEMU running as a throwaway unprivileged user; the guest still boots,
the agent still reads its RAM file and console, and it migrates A -> B."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from novacron.agent.local import LocalAgent
from novacron.agent.vm.qemu_args import QEMU_BINARY
from novacron.agent.vm.sandbox import SANDBOX_ARGS
from tests.migration.agents import Api
from tests.migration.qemu_helpers import heartbeats
from tests.migration.test_e2e_agents import hop

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def qemu_user() -> Iterator[pwd.struct_passwd | None]:
    """A system user made for this test (unique name, removed after), or None
    when the tests do not run as root (then QEMU runs as the agent's user)."""
    if os.geteuid() != 0:
        yield None
        return
    if shutil.which("useradd") is None:
        pytest.skip("useradd not available")
    name = f"ncq-{os.getpid()}-{secrets.token_hex(2)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin",
                    name], check=True, capture_output=True)  # fmt: skip
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def test_qemu_runas_does_not_survive_the_sandbox(qemu_user: pwd.struct_passwd | None) -> None:
    """Why the agent drops QEMU's privileges itself (sandbox.py): QEMU 7.2's
    ``-runas`` changes uid after installing its seccomp filter, and
    ``elevateprivileges=deny`` kills it for that. Should a QEMU ever survive
    this, ``-runas`` (``-run-with user=`` in newer QEMUs) becomes an option."""
    if qemu_user is None:
        pytest.skip("needs root (to make a user to run as)")
    argv = [QEMU_BINARY, "-machine", "none", "-nodefaults", "-display", "none", *SANDBOX_ARGS,
            "-runas", qemu_user.pw_name]  # fmt: skip
    try:
        res = subprocess.run(argv, capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("QEMU now runs with -runas under elevateprivileges=deny: revisit sandbox.py")
    assert res.returncode == -signal.SIGSYS, res


def process_ids(pid: int) -> tuple[set[int], set[int], set[int], int]:
    """(uids, gids, supplementary groups, seccomp mode) of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    ids = {k: {int(x) for x in fields[k].split()} for k in ("Uid", "Gid", "Groups")}
    return ids["Uid"], ids["Gid"], ids["Groups"], int(fields["Seccomp"])


def assert_confined(vm: dict, user: pwd.struct_passwd | None) -> None:
    uids, gids, groups, seccomp = process_ids(vm["pid"])
    assert seccomp == 2  # a seccomp filter is installed (QEMU's -sandbox)
    if user is not None:
        # real, effective, saved and fs ids all the QEMU user's; no root group left
        assert uids == {user.pw_uid} and gids == {user.pw_gid} and 0 not in groups
        ram, log = os.stat(vm["ram_path"]), os.stat(vm["serial_log"])
        # RAM: QEMU maps it through the group, the agent reads it as owner
        assert (ram.st_uid, ram.st_gid, stat.S_IMODE(ram.st_mode)) == (0, user.pw_gid, 0o660)
        # console log: the agent's alone; QEMU only holds the descriptor it inherited
        assert (log.st_uid, stat.S_IMODE(log.st_mode)) == (0, 0o600)
    cmdline = Path(f"/proc/{vm['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"-sandbox" in cmdline and not any(b"/.cache/" in a for a in cmdline)


async def test_sandboxed_unprivileged_guest_boots_and_migrates(qemu_user: pwd.struct_passwd | None) -> None:
    secret = secrets.token_urlsafe(32)
    settings = {"qemu_user": qemu_user.pw_name} if qemu_user else {}
    async with LocalAgent("sbx-a", cluster_secret=secret, accel="tcg", settings=dict(settings)) as a, \
            LocalAgent("sbx-b", cluster_secret=secret, accel="tcg", settings=dict(settings)) as b:
        api_a, api_b = Api(a), Api(b)
        await api_a.create_guest("boxed", rate_mb=4)
        vm = await api_a.ok("GET", "/v1/vms/boxed")
        assert_confined(vm, qemu_user)
        text, _ = await api_a.console("boxed")
        boot = heartbeats(text)[-1][0]
        await hop(a, b, "boxed", boot)  # the agent reads guest RAM, QEMU relays device state
        assert_confined(await api_b.ok("GET", "/v1/vms/boxed"), qemu_user)
        with contextlib.suppress(Exception):
            await api_b.ok("DELETE", "/v1/vms/boxed")
