"""A restarted agent verifies the coordinator's grants at once: the key it got at its
last registration is kept in its state dir (a damaged file is ignored); a grant that
does not verify before the registration is answered is checked again once it is."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import novacron.agent.migration.manager as manager_mod
from novacron.agent.api.migrations import GRANT_KEY_FILE, save_grant_key, saved_grant_key
from novacron.agent.migration.manager import MigrationManager, MigrationRequestError
from novacron.agent.vm.errors import VMConflict
from novacron.grants import GrantSigner, GrantVerifier


def test_the_coordinators_key_survives_a_restart(tmp_path: Path) -> None:
    assert saved_grant_key(tmp_path) == ""
    signer = GrantSigner.generate()
    save_grant_key(tmp_path, signer.public_key)
    key = saved_grant_key(tmp_path)
    assert key == signer.public_key
    grant = signer.issue(migration="m-1", vm="v", source="a", target="b", url="http://b:1",
                         data_host="b", data_port=2)
    assert GrantVerifier(key).verify(grant).migration == "m-1"
    (tmp_path / GRANT_KEY_FILE).write_text("not a key")
    assert saved_grant_key(tmp_path) == ""
    (tmp_path / GRANT_KEY_FILE).write_bytes(b"\xff\xfe")
    assert saved_grant_key(tmp_path) == ""


def _manager(key: str) -> Any:
    async def source_vm(name: str) -> Any:
        raise VMConflict(f"reached the VM lookup for {name}")  # past the grant check

    async def no_dest(*_a: Any) -> Any:
        raise AssertionError("no incoming migration here")

    mgr = MigrationManager(cluster_secret="s" * 32, source_vm=source_vm, dest_factory=no_dest,  # type: ignore[arg-type]
                           host_name="a", grants=GrantVerifier(key))
    mgr.key_current.clear()  # as attach() does for an agent with a coordinator
    return mgr


async def test_a_grant_sent_while_the_registration_answer_is_read_is_accepted() -> None:
    """The coordinator lists the host as up as it answers the registration; a grant
    it signs at once may reach the agent before the agent has read the new key."""
    old, new = GrantSigner.generate(), GrantSigner.generate()
    mgr = _manager(old.public_key)
    grant = new.issue(migration="m-2", vm="v", source="a", target="b", url="http://b:1",
                      data_host="b", data_port=2)
    start = asyncio.create_task(mgr.start_migration({"vm": "v", "grant": grant}))
    await asyncio.sleep(0.2)
    assert not start.done()  # waiting for the key, not refused
    mgr.grants.set_key(new.public_key)  # what daemon.registered does with the answer
    mgr.key_current.set()
    with pytest.raises(VMConflict, match="reached the VM lookup"):
        await asyncio.wait_for(start, 5)


async def test_a_foreign_grant_is_still_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager_mod, "KEY_WAIT_S", 0.2)
    ours, foreign = GrantSigner.generate(), GrantSigner.generate()
    mgr = _manager(ours.public_key)
    grant = foreign.issue(migration="m-3", vm="v", source="a", target="b", url="http://b:1",
                          data_host="b", data_port=2)
    with pytest.raises(MigrationRequestError, match="does not verify") as err:
        await mgr.start_migration({"vm": "v", "grant": grant})  # no answer came: refused in time
    assert err.value.status == 403
    mgr.key_current.set()  # registered: refused at once
    with pytest.raises(MigrationRequestError, match="does not verify"):
        await asyncio.wait_for(mgr.start_migration({"vm": "v", "grant": grant}), 0.1)
