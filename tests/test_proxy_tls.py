"""TLS on both legs: clients to the proxy (spec.tls), the proxy to the server (sslMode with
libpq's meanings, sslRootCert)."""

from __future__ import annotations

import datetime
import os
import pwd
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fix_pg import APP_PASSWORD, APP_USER
from fix_proxy import ProxyHandle
from proxy_helpers import superuser
from rawpg import PgError, RawConn

from pgwarden.embedded import EmbeddedPostgres


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_pki(folder: Path) -> Pki:
    """A CA, and a server certificate it signed for the name `localhost` only (not 127.0.0.1)."""
    ca_key, ca_cert = _ca("pgwarden test CA")
    _, other = _ca("some other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "other-ca.pem")
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.other_ca.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pki.key.chmod(0o600)
    return pki


def _server_owner() -> pwd.struct_passwd | None:
    """Whom the embedded server runs as: `postgres` under root (initdb refuses root), else us."""
    return pwd.getpwnam("postgres") if os.geteuid() == 0 else None


@pytest.fixture(scope="module")
def tls_pg() -> Iterator[tuple[EmbeddedPostgres, Pki]]:
    """A dedicated server with ssl=on; its key readable by the server's user only."""
    base = Path(tempfile.mkdtemp(prefix="pgwarden-tls-"))
    (base / "tls").mkdir()
    pki = make_pki(base / "tls")
    owner = _server_owner()
    if owner is not None:
        for p in (base / "tls", pki.ca, pki.cert, pki.key, pki.other_ca):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    (base / "tls").chmod(0o755)
    server = EmbeddedPostgres(
        base=base,
        settings={"ssl": "on", "ssl_cert_file": f"'{pki.cert}'", "ssl_key_file": f"'{pki.key}'"},
    )
    server.start()
    try:
        server.psql(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'")
        server.psql(f"CREATE DATABASE shop OWNER {APP_USER}")
        yield server, pki
    finally:
        server.stop()


def ssl_of_backend(pg: EmbeddedPostgres, pid: int) -> tuple[bool, str] | None:
    with superuser(pg) as direct:
        row = direct.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = %s", (pid,)).fetchone()
    return (bool(row[0]), str(row[1])) if row else None


# -- proxy -> server -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "host", "root"),
    [("require", "127.0.0.1", False), ("verify-ca", "127.0.0.1", True), ("verify-full", "localhost", True)],
)
def test_tls_to_the_server(
    make_proxy: Callable[..., ProxyHandle],
    tls_pg: tuple[EmbeddedPostgres, Pki],
    mode: str,
    host: str,
    root: bool,
) -> None:
    server, pki = tls_pg
    spec = {
        "host": host,
        "port": server.port,
        "sslMode": mode,
        **({"sslRootCert": str(pki.ca)} if root else {}),
    }
    proxy = make_proxy(connection_spec=spec)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
        ssl = ssl_of_backend(server, pid)
    assert ssl is not None and ssl[0] is True and ssl[1].startswith("TLS")


def _connect_error(proxy: ProxyHandle) -> dict[str, str]:
    """The fields of the ErrorResponse a client gets when the proxy cannot log in upstream."""
    with pytest.raises(PgError) as e:
        RawConn.login(proxy.host, proxy.port, proxy.user, proxy.password, proxy.dbname)
    fields = e.value.fields
    assert fields["C"] == "08006" and fields["S"] == "FATAL", fields
    return fields


def test_verify_full_refuses_a_certificate_for_another_name(
    make_proxy: Callable[..., ProxyHandle], tls_pg: tuple[EmbeddedPostgres, Pki]
) -> None:
    server, pki = tls_pg
    proxy = make_proxy(
        connection_spec={
            "host": "127.0.0.1",
            "port": server.port,
            "sslMode": "verify-full",
            "sslRootCert": str(pki.ca),
        }
    )
    err = _connect_error(proxy)
    assert "pgwarden does not trust the database at 127.0.0.1" in err["M"], err
    assert "IP address mismatch" in err["M"], err
    assert "sslRootCert" in err["H"] and "retry" not in err["H"]


def test_verify_ca_refuses_a_certificate_from_another_ca(
    make_proxy: Callable[..., ProxyHandle], tls_pg: tuple[EmbeddedPostgres, Pki]
) -> None:
    server, pki = tls_pg
    proxy = make_proxy(
        connection_spec={
            "host": "127.0.0.1",
            "port": server.port,
            "sslMode": "verify-ca",
            "sslRootCert": str(pki.other_ca),
        }
    )
    err = _connect_error(proxy)
    assert "does not trust the database" in err["M"] and "unable to get local issuer" in err["M"], err


def test_require_against_a_server_without_tls(
    make_proxy: Callable[..., ProxyHandle], pg: EmbeddedPostgres
) -> None:
    proxy = make_proxy(connection_spec={"sslMode": "require"})
    err = _connect_error(proxy)
    assert "does not accept TLS but sslMode is require" in err["M"], err
    assert "Enable ssl on the server" in err["H"]


def test_prefer_falls_back_to_plaintext(make_proxy: Callable[..., ProxyHandle], pg: EmbeddedPostgres) -> None:
    proxy = make_proxy(connection_spec={"sslMode": "prefer"})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
        ssl = ssl_of_backend(pg, pid)
    assert ssl is not None and ssl[0] is False


# -- client -> proxy -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def client_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("client-tls"))


@pytest.fixture
def tls_proxy(make_proxy: Callable[..., ProxyHandle], client_pki: Pki) -> ProxyHandle:
    return make_proxy(proxy_spec={"tls": {"certFile": str(client_pki.cert), "keyFile": str(client_pki.key)}})


def test_psql_with_sslmode_require(tls_proxy: ProxyHandle) -> None:
    r = subprocess.run(
        ["psql", "-X", "-A", "-t", "-c", "SELECT count(*) FROM customers", "-c", r"\conninfo"],
        capture_output=True,
        text=True,
        env=tls_proxy.env(PGSSLMODE="require"),
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "5"
    assert "SSL connection (protocol: TLS" in r.stdout


def test_client_verifies_the_proxy_certificate(tls_proxy: ProxyHandle, client_pki: Pki) -> None:
    dsn = tls_proxy.dsn(sslmode="verify-full", sslrootcert=str(client_pki.ca), host="localhost")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT name FROM customers WHERE id = 1").fetchone() == ("Ada Lovelace",)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(tls_proxy.dsn(sslmode="verify-full", sslrootcert=str(client_pki.other_ca)))


def test_without_tls_configured_the_proxy_answers_no(proxy: ProxyHandle) -> None:
    with psycopg.connect(proxy.dsn(sslmode="prefer"), autocommit=True) as conn:
        assert not conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(proxy.dsn(sslmode="require"))
    assert "SSL" in str(e.value) or "ssl" in str(e.value)
