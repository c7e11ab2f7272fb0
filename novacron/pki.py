"""The fleet CA and per-host certificates (EC P-256, made with ``cryptography``).

One CA per fleet signs one certificate per host (and one for the coordinator);
every daemon serves HTTPS with its own certificate and presents the same one as
its client certificate, so a peer's identity is the certificate's common name.

Files in the PKI directory: ``ca.crt``/``ca.key`` and ``<name>.crt``/``<name>.key``.
Keys are written 0600 and never overwritten (issue refuses an existing name
unless told to replace it).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650  # the CA outlives many host certificates; rotate it deliberately
HOST_DAYS = 397  # host certificates: about a year (the browser-era upper bound)
CLOCK_SKEW = datetime.timedelta(minutes=5)  # valid a little before "now" on skewed peers
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class PkiError(Exception):
    """A PKI operation cannot be done (missing CA, bad name, file exists)."""


@dataclass(frozen=True)
class IssuedFiles:
    cert: Path
    key: Path
    ca: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ca_paths(directory: Path) -> tuple[Path, Path]:
    return directory / "ca.crt", directory / "ca.key"


def init_ca(directory: Path, name: str = "NovaCron fleet CA", days: int = CA_DAYS) -> Path:
    """Create the CA in ``directory``; refuses to replace an existing one."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = ca_paths(directory)
    if cert_path.exists() or key_path.exists():
        raise PkiError(f"a CA exists already in {directory}")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def issue(directory: Path, name: str, sans: list[str] | None = None, *, days: int = HOST_DAYS,
          replace: bool = False) -> IssuedFiles:
    """A key and certificate for host ``name`` (CN and first SAN), signed by the CA.

    ``sans`` are extra DNS names or IP addresses the host is reached by; the
    certificate is good for both TLS server and client use (mutual TLS).
    """
    if not NAME_RE.fullmatch(name):
        raise PkiError(f"bad host name {name!r}: letters, digits, '.', '_', '-' (max 63)")
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    if name == "ca":
        raise PkiError("'ca' is the CA's own file name; pick another host name")
    ca_cert_path, ca_key_path = ca_paths(directory)
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PkiError(f"no CA in {directory}: run 'novacron pki init --dir {directory}' first") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{ca_key_path}: not an EC private key")
    if (cert_path.exists() or key_path.exists()) and not replace:
        raise PkiError(f"{cert_path.name} exists already (use --replace to issue a new one)")
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for value in [name, *(sans or [])]:
        general = _san(value)
        if general not in names:
            names.append(general)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, data_encipherment=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    for path in (cert_path, key_path):
        path.unlink(missing_ok=True)
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return IssuedFiles(cert_path, key_path, ca_cert_path)

