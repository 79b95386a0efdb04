"""kopf's webhook server, with self-signed certificates made by `cryptography`.

kopf generates self-signed certificates with `certbuilder`/`oscrypto` (an optional extra that
does not work with OpenSSL 3); `cryptography` is already installed with PyJWT[crypto]. Given
`certfile`/`pkeyfile` (cert-manager or the chart's Secret), the server uses those instead and
re-reads them when they change — that is kopf's own logic, unchanged.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Collection

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def self_signed(hostnames: Collection[str], password: str | None = None, days: int = 365) -> tuple[bytes, bytes]:
    """A CA-capable self-signed certificate for `hostnames` (DNS names and IPs), PEM."""
    names: list[x509.GeneralName] = []
    common = ""
    for h in dict.fromkeys(hostnames):
        try:
            ip = ipaddress.ip_address(h)
        except ValueError:
            names.append(x509.DNSName(h))
            common = common or h
            continue
        if not ip.is_unspecified:
            names.append(x509.IPAddress(ip))
            common = common or str(ip)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common or "pgwarden-webhook")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    enc = (serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption())
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))


class WebhookServer(kopf.WebhookServer):
    """kopf.WebhookServer whose self-signed certificates need no extra dependency."""

    @staticmethod
    def build_certificate(hostnames: Collection[str], password: str | None = None) -> tuple[bytes, bytes]:
        return self_signed(hostnames, password)
