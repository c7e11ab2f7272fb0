"""Migration grants: the coordinator's signed, short-lived, single-use permission
for one migration.

A grant names the migration, the VM, the source and destination hosts, the
destination's API URL and data-channel address (both from the coordinator's
registry) and an expiry. The coordinator signs it with its Ed25519 key; agents
learn the public key when they register (or from ``grant_key`` in their
config). The source agent takes the destination's address only from a grant
naming itself as source; the destination agent accepts an incoming migration
only with a grant naming itself as destination and that VM, once. No agent
credential ever travels to another agent.

Wire form: ``ncg1.<base64url(JSON payload)>.<base64url(signature)>``; the
signature covers ``ncg1.<payload>``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PREFIX = "ncg1."
TTL_S = 60.0  # the source must open the channel within this; a grant is for one start only
MAX_LEN = 4096
CLOCK_SKEW_S = 30.0  # hosts' clocks may differ a little (an issued-in-the-future grant)


class GrantError(ValueError):
    """A grant is malformed, forged, expired, used already, or names someone else."""


@dataclass(frozen=True)
class Grant:
    migration: str  # the coordinator's migration id
    vm: str
    source: str  # host names as registered with the coordinator
    target: str
    url: str  # the destination agent's API, from the registry
    data_host: str  # the destination's migration channel, from the registry
    data_port: int
    issued: float
    expires: float
    nonce: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class GrantSigner:
    """The coordinator's signing key (persisted, so grants and agents survive a restart)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> GrantSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> GrantSigner:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            signer = cls.generate()
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(signer._key.private_bytes(serialization.Encoding.Raw,
                                                  serialization.PrivateFormat.Raw,
                                                  serialization.NoEncryption()))
            tmp.replace(path)
            return signer
        if len(raw) != 32:
            raise GrantError(f"{path}: not a 32-byte Ed25519 key")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @property
    def public_key(self) -> str:
        """The verification key agents need, base64url of the raw 32 bytes."""
        return _b64(self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw))

    def issue(self, *, migration: str, vm: str, source: str, target: str, url: str,
              data_host: str, data_port: int, ttl_s: float = TTL_S) -> str:
        now = time.time()
        grant = Grant(migration=migration, vm=vm, source=source, target=target, url=url,
                      data_host=data_host, data_port=data_port, issued=now, expires=now + ttl_s,
                      nonce=secrets.token_hex(16))
        body = PREFIX + _b64(json.dumps(grant.as_dict(), separators=(",", ":")).encode())
        return body + "." + _b64(self._key.sign(body.encode()))


class GrantVerifier:
    """Checks grants against the coordinator's public key (set once known)."""

    def __init__(self, public_key: str = "") -> None:
        self._key: Ed25519PublicKey | None = None
        if public_key:
            self.set_key(public_key)

    @property
    def ready(self) -> bool:
        return self._key is not None

    def set_key(self, public_key: str) -> None:
        try:
            raw = _unb64(public_key)
            self._key = Ed25519PublicKey.from_public_bytes(raw)
        except (ValueError, binascii.Error):
            raise GrantError("grant key: not a base64url Ed25519 public key") from None

    def verify(self, token: Any, *, now: float | None = None, check_expiry: bool = True) -> Grant:
        """The grant ``token`` carries, if the coordinator signed it (and it has not expired)."""
        if self._key is None:
            raise GrantError("no grant key yet (this agent has not registered with a coordinator)")
        if not isinstance(token, str) or not token.startswith(PREFIX) or len(token) > MAX_LEN:
            raise GrantError("malformed grant")
        body, _, sig = token.rpartition(".")
        try:
            self._key.verify(_unb64(sig), body.encode())
        except (InvalidSignature, ValueError, binascii.Error):
            raise GrantError("grant signature does not verify (not issued by our coordinator)") from None
        try:
            doc = json.loads(_unb64(body[len(PREFIX):]))
            grant = Grant(**doc)
        except (ValueError, TypeError, binascii.Error):
            raise GrantError("malformed grant payload") from None
        now = time.time() if now is None else now
        if check_expiry and not grant.issued - CLOCK_SKEW_S <= now <= grant.expires:
            raise GrantError("grant expired")
        return grant


class UsedGrants:
    """Nonces of grants consumed here, kept until they expire (single use)."""

    def __init__(self) -> None:
        self._used: dict[str, Grant] = {}

    def consume(self, grant: Grant, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for nonce in [n for n, g in self._used.items() if g.expires + CLOCK_SKEW_S < now]:
            del self._used[nonce]
        if grant.nonce in self._used:
            raise GrantError("grant used already")
        self._used[grant.nonce] = grant
