"""A restarted agent verifies the coordinator's grants at once: the key it got at its
last registration is kept in its state dir (a damaged file is ignored)."""

from __future__ import annotations

from pathlib import Path

from novacron.agent.api.migrations import GRANT_KEY_FILE, save_grant_key, saved_grant_key
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
