"""Connecting to the real PostgreSQL server: TLS per libpq's sslmode, then authentication.

Upstream credentials are resolved for every new connection, so a rotated Secret (the
operator's) is picked up without a restart; sessions already open keep their login.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import scramp

from pgwarden.errors import UpstreamUnavailable
from pgwarden.proxy import messages as m
from pgwarden.proxy.config import ProxyConfig
from pgwarden.proxy.wire import ConnectionClosed, Endpoint

MAX_AUTH_MESSAGE = 1 << 20


@dataclass
class UpstreamSession:
    endpoint: Endpoint
    parameters: list[tuple[str, str]]
    pid: int
    secret: int
    username: str

    @property
    def server_version(self) -> int:
        """The server's major version from its `server_version` ParameterStatus (0: not sent)."""
        for name, value in self.parameters:
            if name == "server_version":
                match = re.match(r"\d+", value)  # "18.4 (Debian 18.4-1)", "19beta1"
                return int(match.group()) if match else 0
        return 0


def ssl_context_for(mode: str, root_cert: str = "") -> ssl.SSLContext | None:
    """libpq's sslmode meanings. None: do not ask for TLS."""
    if mode == "disable":
        return None
    ctx = ssl.create_default_context(cafile=root_cert or None)
    if mode in ("allow", "prefer", "require"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif mode == "verify-ca":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _socket_path(cfg: ProxyConfig) -> str:
    """The server's socket file in the configured folder, named as libpq names it."""
    return f"{cfg.upstream_unix_socket.rstrip('/')}/.s.PGSQL.{cfg.connection.port}"


async def open_socket(cfg: ProxyConfig) -> Endpoint:
    loop = asyncio.get_running_loop()
    conn = cfg.connection
    if cfg.upstream_unix_socket:
        _, ep = await loop.create_unix_connection(Endpoint, _socket_path(cfg))
        return ep
    _, ep = await loop.create_connection(Endpoint, conn.host, conn.port)
    return ep


async def connect(cfg: ProxyConfig, client_params: Mapping[str, str]) -> UpstreamSession:
    """Open, secure and authenticate one upstream connection; raise UpstreamUnavailable."""
    conn = cfg.connection
    where = f"{conn.host}:{conn.port}/{conn.database}"
    if cfg.upstream_unix_socket:
        where = f"{_socket_path(cfg)} (database {conn.database})"
    try:
        user, password = cfg.upstream.resolve()
    except RuntimeError as e:
        raise UpstreamUnavailable(f"pgwarden cannot log in to the database: {e}") from e
    ep: Endpoint | None = None
    try:
        async with asyncio.timeout(cfg.upstream_connect_timeout):
            ep = await open_socket(cfg)
            if not cfg.upstream_unix_socket:
                await _negotiate_tls(ep, conn.ssl_mode, conn.ssl_root_cert, conn.host)
            params = {"user": user, "database": conn.database, **client_params}
            params["search_path"] = ",".join(_quote_ident(s) for s in cfg.search_path)
            # The server must read exactly the text the policy engine parsed: UTF-8, and
            # backslashes in ordinary string literals taken literally.
            params["client_encoding"] = "UTF8"
            params["standard_conforming_strings"] = "on"
            ep.write(m.build_startup(params))
            await _authenticate(ep, user, password)
            return await _read_until_ready(ep, user)
    except (UpstreamUnavailable, asyncio.CancelledError):  # cancelled: a caller's deadline (previews)
        if ep is not None:
            ep.close()
        raise
    except ssl.SSLCertVerificationError as e:
        if ep is not None:
            ep.close()
        raise UpstreamUnavailable(
            f"pgwarden does not trust the database at {where} (sslMode {conn.ssl_mode}): "
            f"{e.verify_message or e.reason or e}",
            hint="Operators: check the DatabaseConnection's sslRootCert, and that its host is a name "
            "the server's certificate was issued for.",
        ) from e
    except (OSError, TimeoutError, ConnectionClosed, m.FrameError, ssl.SSLError) as e:
        if ep is not None:
            ep.close()
        reason = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
        raise UpstreamUnavailable(
            f"pgwarden cannot reach the database at {where}: {reason}",
            hint="The database may be down or restarting; retry in a moment. Operators: check the "
            "DatabaseConnection host, port and sslMode.",
        ) from e


_PLAIN_IDENT = re.compile(r"[a-z_][a-z0-9_$]*")


def _quote_ident(name: str) -> str:
    """Quote a schema name only when it needs it, so `SHOW search_path` reads `public` as usual."""
    if _PLAIN_IDENT.fullmatch(name):
        return name
    return '"' + name.replace('"', '""') + '"'


async def _negotiate_tls(ep: Endpoint, mode: str, root_cert: str, host: str) -> None:
    ctx = ssl_context_for(mode, root_cert)
    if ctx is None:
        return
    ep.write(m.build_ssl_request())
    answer = await ep.read_byte()
    if answer == b"S":
        if ep.buf:
            raise UpstreamUnavailable("the database sent unencrypted bytes after agreeing to TLS; refusing")
        await ep.start_tls(ctx, server_side=False, server_hostname=host if mode == "verify-full" else None)
    elif answer == b"N":
        if mode in ("require", "verify-ca", "verify-full"):
            raise UpstreamUnavailable(
                f"the database does not accept TLS but sslMode is {mode}",
                hint="Enable ssl on the server, or lower the DatabaseConnection's sslMode knowingly.",
            )
    else:
        raise UpstreamUnavailable(f"unexpected answer {answer!r} to SSLRequest")


async def _authenticate(ep: Endpoint, user: str, password: str) -> None:
    scram: scramp.ScramClient | None = None
    while True:
        kind, payload = await ep.read_message(MAX_AUTH_MESSAGE)
        if kind == m.B_ERROR:
            f = m.parse_fields(payload)
            raise UpstreamUnavailable(
                f"the database refused pgwarden's login as {user!r}: {f.get('M', '')}",
                hint="Operators: check the upstream credentials (the DatabaseConnection's rotated Secret).",
            )
        if kind != m.B_AUTH:
            raise UpstreamUnavailable(f"unexpected message {kind!r} during authentication")
        code = m.U32.unpack_from(payload, 0)[0]
        if code == m.AUTH_OK:
            return
        if code == m.AUTH_CLEARTEXT:
            ep.write(m.message(m.F_PASSWORD, m.cstr(password)))
        elif code == m.AUTH_MD5:
            salt = payload[4:8]
            inner = hashlib.md5((password + user).encode()).hexdigest().encode()
            ep.write(m.message(m.F_PASSWORD, m.cstr("md5" + hashlib.md5(inner + salt).hexdigest())))
        elif code == m.AUTH_SASL:
            mechs = [x.decode() for x in payload[4:].split(b"\0") if x]
            if "SCRAM-SHA-256" not in mechs:
                raise UpstreamUnavailable(f"the database offers no supported SASL mechanism: {mechs}")
            scram = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
            first = scram.get_client_first().encode()
            ep.write(m.message(m.F_PASSWORD, m.cstr("SCRAM-SHA-256") + m.I32.pack(len(first)) + first))
        elif code == m.AUTH_SASL_CONTINUE and scram is not None:
            scram.set_server_first(payload[4:].decode())
            ep.write(m.message(m.F_PASSWORD, scram.get_client_final().encode()))
        elif code == m.AUTH_SASL_FINAL and scram is not None:
            try:
                scram.set_server_final(payload[4:].decode())
            except scramp.ScramException as e:
                raise UpstreamUnavailable(f"the database failed SCRAM server verification: {e}") from e
        else:
            raise UpstreamUnavailable(f"the database asked for an unsupported authentication method ({code})")


async def _read_until_ready(ep: Endpoint, user: str) -> UpstreamSession:
    params: list[tuple[str, str]] = []
    pid = secret = 0
    while True:
        kind, payload = await ep.read_message(MAX_AUTH_MESSAGE)
        if kind == m.B_PARAM_STATUS:
            name, _, rest = payload.partition(b"\0")
            params.append((name.decode(), rest.rstrip(b"\0").decode()))
        elif kind == m.B_KEY_DATA:
            pid, secret = m.I32.unpack_from(payload, 0)[0], m.U32.unpack_from(payload, 4)[0]
        elif kind == m.B_READY:
            return UpstreamSession(ep, params, pid, secret, user)
        elif kind == m.B_ERROR:
            f = m.parse_fields(payload)
            raise UpstreamUnavailable(f"the database refused the session: {f.get('M', '')}")
        # NoticeResponse during startup: ignored


async def send_cancel(cfg: ProxyConfig, pid: int, secret: int) -> None:
    """Forward a cancel on a fresh upstream connection (the protocol's way)."""
    try:
        async with asyncio.timeout(cfg.upstream_connect_timeout):
            ep = await open_socket(cfg)
            ep.write(m.build_cancel(pid, secret))
            # the server closes the connection when it has processed the request
            while not ep.closed:
                try:
                    await ep.read_byte()
                except ConnectionClosed:
                    break
    except (OSError, TimeoutError, ConnectionClosed):
        pass
