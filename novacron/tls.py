"""TLS for the daemons' HTTP APIs: contexts from the fleet CA's files, peer identity,
and the rule that plain HTTP is for loopback only.

Settings (agent and coordinator alike): ``tls_cert``, ``tls_key`` (this host's
certificate and key, issued by ``novacron pki issue``) and ``tls_ca`` (the fleet
CA). All three or none. A server with TLS verifies any client certificate
against the CA; the same certificate is the daemon's client certificate when it
calls a peer (mutual TLS), and its common name is the daemon's identity.
"""

from __future__ import annotations

import ipaddress
import ssl
from typing import Any, Protocol
from urllib.parse import urlsplit

from novacron.config import Invalid

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


class TlsSettings(Protocol):
    host: str
    tls_cert: str
    tls_key: str
    tls_ca: str
    insecure: bool


def enabled(cfg: TlsSettings) -> bool:
    return bool(cfg.tls_cert)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check(cfg: TlsSettings) -> None:
    """A settings check (``config.Invalid``): TLS files go together, and no plain HTTP
    off loopback unless the operator said ``insecure``."""
    given = [k for k in ("tls_cert", "tls_key", "tls_ca") if getattr(cfg, k)]
    if given and len(given) != 3:
        missing = next(k for k in ("tls_cert", "tls_key", "tls_ca") if not getattr(cfg, k))
        raise Invalid(missing, "tls_cert, tls_key and tls_ca must be set together")
    if not given and not cfg.insecure and not is_loopback(cfg.host):
        raise Invalid("host", f"refusing to listen on {cfg.host} without TLS: set tls_cert, "
                              "tls_key and tls_ca, or insecure = true (--insecure) for plain HTTP")


def check_peer_url(cfg: TlsSettings, key: str) -> None:
    """A settings check: ``cfg.<key>`` (a URL this daemon sends credentials to) is https,
    or plain http on loopback, or the operator said ``insecure``."""
    url = getattr(cfg, key)
    if not url or cfg.insecure:
        return
    parts = urlsplit(url)
    if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        raise Invalid(key, f"{url} is plain HTTP off loopback: use https (or insecure = true)")


def server_context(cfg: TlsSettings, *, require_client_cert: bool) -> ssl.SSLContext:
    """Serve with our certificate; verify client certificates against the fleet CA.

    ``require_client_cert`` False still refuses a certificate the CA did not
    sign; it only lets clients without one (operators' CLIs) through to the
    token check.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cfg.tls_ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(ca: str, cert: str = "", key: str = "") -> ssl.SSLContext:
    """Verify the server against ``ca`` (host name included); present ``cert`` if given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


def verify_context(ca: str) -> ssl.SSLContext | None:
    """For clients without a certificate (the CLI): trust ``ca``; None: the system's CAs."""
    return client_context(ca) if ca else None


def peer_client_context(cfg: TlsSettings) -> ssl.SSLContext | None:
    """The context a daemon uses to call its peers: fleet CA + its own certificate (mTLS)."""
    if not enabled(cfg):
        return None
    return client_context(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)


def peer_common_name(transport: Any) -> str | None:
    """The verified client certificate's common name on ``transport``, if one was presented."""
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str) and value:
                return value
    return None


def url_scheme(cfg: TlsSettings) -> str:
    return "https" if enabled(cfg) else "http"
