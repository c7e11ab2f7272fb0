"""Mutual authentication and per-connection key agreement.

Three fixed-size messages (client hello, server hello + proof, client proof),
then a one-byte verdict. Each side proves knowledge of the cluster secret with
an HMAC over the whole transcript (both nonces and both X25519 public keys), so
a proof cannot be replayed into another connection and a man in the middle
cannot swap keys. Session keys come from HKDF-SHA256 over the X25519 shared
secret with the secret-keyed transcript as info, so even a leaked transcript
plus a broken X25519 run does not give keys without the cluster secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"NCMIG\x00\x01\x00"  # protocol name + version 1
NONCE = 32
PUB = 32
MAC = 32
ACCEPT = b"\x01"
CLIENT_HELLO = len(MAGIC) + NONCE + PUB
SERVER_HELLO = len(MAGIC) + NONCE + PUB + MAC
DEFAULT_TIMEOUT = 10.0


class ByteReader(Protocol):
    """What the channel reads from: an ``asyncio.StreamReader`` or a ``stream.ChannelStream``."""

    async def readexactly(self, n: int) -> bytes | bytearray: ...


class ByteWriter(Protocol):
    """What the channel writes to: an ``asyncio.StreamWriter`` or a ``stream.ChannelStream``."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...

    def is_closing(self) -> bool: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class AuthError(Exception):
    """The peer failed authentication or broke the handshake protocol."""


@dataclass(frozen=True)
class SessionKeys:
    """Four independent 32-byte keys: control and page stream, per direction.

    ``c2s`` is client (migration source) to server (destination).
    """

    ctrl_c2s: bytes
    ctrl_s2c: bytes
    pages_c2s: bytes
    pages_s2c: bytes
    session_id: str  # public, for logs: a hash of the transcript

    def __repr__(self) -> str:  # keys must never reach a log line
        return f"SessionKeys(session_id={self.session_id})"


def _secret_bytes(secret: str | bytes) -> bytes:
    raw = secret.encode() if isinstance(secret, str) else secret
    if len(raw) < 8:
        raise ValueError("cluster secret must be at least 8 bytes")
    return raw


def _pub_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _derive(secret: bytes, priv: X25519PrivateKey, peer_pub: bytes, transcript: bytes) -> SessionKeys:
    try:
        shared = priv.exchange(X25519PublicKey.from_public_bytes(peer_pub))
    except ValueError as exc:  # low-order point gives an all-zero secret
        raise AuthError(f"bad X25519 public key from peer: {exc}") from None
    info = b"novacron migration keys v1" + hmac.digest(secret, b"keys" + transcript, "sha256")
    okm = HKDF(
        algorithm=hashes.SHA256(), length=128, salt=hashlib.sha256(transcript).digest(), info=info
    ).derive(shared)
    return SessionKeys(
        okm[0:32], okm[32:64], okm[64:96], okm[96:128], hashlib.sha256(transcript).hexdigest()[:16]
    )


def _proof(secret: bytes, role: bytes, transcript: bytes) -> bytes:
    """What ``role`` (b"client"/b"server") sends to prove it holds the cluster secret."""
    return hmac.digest(secret, role + transcript, "sha256")


def _check_magic(msg: bytes) -> None:
    if msg[: len(MAGIC)] != MAGIC:
        raise AuthError("peer does not speak the NovaCron migration protocol v1")


async def _read(reader: ByteReader, n: int, timeout: float, what: str) -> bytes:
    try:
        return bytes(await asyncio.wait_for(reader.readexactly(n), timeout))
    except asyncio.IncompleteReadError:
        raise AuthError(f"peer closed the connection during {what}") from None
    except TimeoutError:
        raise AuthError(f"peer sent no {what} within {timeout:g}s") from None
    except OSError as exc:
        raise AuthError(f"connection failed during {what}: {exc.strerror or exc}") from None


async def client_handshake(
    reader: ByteReader,
    writer: ByteWriter,
    secret: str | bytes,
    timeout: float = DEFAULT_TIMEOUT,
) -> SessionKeys:
    key = _secret_bytes(secret)
    priv = X25519PrivateKey.generate()
    hello = MAGIC + os.urandom(NONCE) + _pub_bytes(priv)
    writer.write(hello)
    await writer.drain()
    reply = await _read(reader, SERVER_HELLO, timeout, "server hello")
    _check_magic(reply)
    body, server_mac = reply[len(MAGIC) : -MAC], reply[-MAC:]
    transcript = hello + MAGIC + body
    if not hmac.compare_digest(server_mac, _proof(key, b"server", transcript)):
        raise AuthError("destination failed authentication (cluster secrets differ?)")
    writer.write(_proof(key, b"client", transcript))
    await writer.drain()
    verdict = await _read(reader, 1, timeout, "authentication verdict")
    if verdict != ACCEPT:
        raise AuthError("destination refused our authentication")
    return _derive(key, priv, body[NONCE:], transcript)


async def server_handshake(
    reader: ByteReader,
    writer: ByteWriter,
    secret: str | bytes,
    timeout: float = DEFAULT_TIMEOUT,
) -> SessionKeys:
    """Authenticate a connecting peer; raises AuthError (caller closes) on any doubt."""
    key = _secret_bytes(secret)
    hello = await _read(reader, CLIENT_HELLO, timeout, "client hello")
    _check_magic(hello)
    priv = X25519PrivateKey.generate()
    body = os.urandom(NONCE) + _pub_bytes(priv)
    transcript = hello + MAGIC + body
    writer.write(MAGIC + body + _proof(key, b"server", transcript))
    await writer.drain()
    client_mac = await _read(reader, MAC, timeout, "client proof")
    if not hmac.compare_digest(client_mac, _proof(key, b"client", transcript)):
        raise AuthError("peer failed authentication (wrong cluster secret)")
    keys = _derive(key, priv, hello[len(MAGIC) + NONCE :], transcript)
    writer.write(ACCEPT)
    await writer.drain()
    return keys
