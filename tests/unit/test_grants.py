"""Migration grants: only the coordinator's key signs them, they expire, they are used once."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from novacron.grants import GrantError, GrantSigner, GrantVerifier, UsedGrants

FIELDS = {"migration": "m-1", "vm": "v", "source": "a", "target": "b", "url": "https://b:7700",
          "data_host": "b", "data_port": 7701}


def test_verify_checks_signature_expiry_and_form() -> None:
    signer = GrantSigner.generate()
    verifier = GrantVerifier(signer.public_key)
    token = signer.issue(**FIELDS)  # type: ignore[arg-type]
    grant = verifier.verify(token)
    assert (grant.vm, grant.source, grant.target, grant.data_port) == ("v", "a", "b", 7701)
    with pytest.raises(GrantError, match="signature"):
        GrantVerifier(GrantSigner.generate().public_key).verify(token)
    with pytest.raises(GrantError, match="expired"):
        verifier.verify(token, now=grant.expires + 1)
    assert verifier.verify(token, now=grant.expires + 1, check_expiry=False) == grant
    for bad in (None, 5, "", "ncg1.", "x" * 5000, token.replace("ncg1.", "ncg2.")):
        with pytest.raises(GrantError):
            verifier.verify(bad)
    with pytest.raises(GrantError, match="no grant key"):
        GrantVerifier().verify(token)
    with pytest.raises(GrantError, match="base64url"):
        GrantVerifier("not a key!")


def test_grants_are_single_use_until_they_expire() -> None:
    signer = GrantSigner.generate()
    verifier, used = GrantVerifier(signer.public_key), UsedGrants()
    first = verifier.verify(signer.issue(**FIELDS))  # type: ignore[arg-type]
    used.consume(first)
    with pytest.raises(GrantError, match="used already"):
        used.consume(first)
    used.consume(verifier.verify(signer.issue(**FIELDS)))  # type: ignore[arg-type]  # a new nonce
    used.consume(verifier.verify(signer.issue(**FIELDS)), now=first.expires + 3600)  # type: ignore[arg-type]
    assert len(used._used) == 1  # expired ones are forgotten (they fail the expiry check anyway)


def test_signing_key_persists_privately(tmp_path: Path) -> None:
    path = tmp_path / "grant-signing.key"
    a = GrantSigner.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert GrantSigner.load_or_create(path).public_key == a.public_key
    path.write_bytes(b"short")
    with pytest.raises(GrantError):
        GrantSigner.load_or_create(path)
