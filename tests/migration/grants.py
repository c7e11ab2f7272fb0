"""Grants for engine-level tests that drive a real MigrationManager as destination."""

from __future__ import annotations

from novacron.agent.channel import Channel
from novacron.grants import GrantSigner, GrantVerifier

SIGNER = GrantSigner.generate()
DEST = "dest"  # the destination manager's host name in these tests


def dest_grants() -> dict[str, object]:
    """MigrationManager keyword arguments: this host's name and the test coordinator's key."""
    return {"host_name": DEST, "grants": GrantVerifier(SIGNER.public_key)}


async def present_grant(ch: Channel, vm: str, migration: str = "m1") -> None:
    """What a source agent sends first: the coordinator's grant for migration ``migration``
    of ``vm`` to DEST (the destination refuses a ``prepare`` of another id or VM)."""
    grant = SIGNER.issue(migration=migration, vm=vm, source="src", target=DEST,
                         url="http://127.0.0.1:9", data_host="127.0.0.1", data_port=9)
    await ch.send_ctrl({"op": "grant", "grant": grant})
