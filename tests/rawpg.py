"""A minimal PostgreSQL client over a raw socket, for fault tests.

Real bytes on a real socket: it can send what no driver would (garbage, truncated messages,
huge length prefixes) and stop reading on purpose. It builds its messages itself rather than
with `pgwarden.proxy.messages`, so the proxy's codec is not testing itself. SCRAM is `scramp`.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import scramp

PROTOCOL_3 = 196608


def msg(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def startup(params: dict[str, str], protocol: int = PROTOCOL_3) -> bytes:
    body = (
        struct.pack("!I", protocol)
        + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
        + b"\0"
    )
    return struct.pack("!I", len(body) + 4) + body


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


# -- the extended protocol, as an attacker writes it (text parameters, no declared types) -----------
def parse(sql: str, name: str = "") -> bytes:
    return msg(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + b"\0\0")


def bind(stmt: str = "", portal: str = "", params: tuple[bytes, ...] = ()) -> bytes:
    body = portal.encode() + b"\0" + stmt.encode() + b"\0" + struct.pack("!h", 0)
    body += struct.pack("!h", len(params)) + b"".join(struct.pack("!i", len(p)) + p for p in params)
    return msg(b"B", body + struct.pack("!h", 0))


def describe(kind: bytes, name: str = "") -> bytes:
    return msg(b"D", kind + name.encode() + b"\0")


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return msg(b"E", portal.encode() + b"\0" + struct.pack("!i", max_rows))


def close(kind: bytes, name: str) -> bytes:
    return msg(b"C", kind + name.encode() + b"\0")


SYNC = msg(b"S")


def error_fields(payload: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in payload.rstrip(b"\0").split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode(errors="replace")
    return out


class Closed(Exception):
    """The server closed the connection."""


@dataclass
class RawConn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    params: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    secret: int = 0

    @classmethod
    def open(cls, host: str, port: int, timeout: float = 30) -> RawConn:
        return cls(socket.create_connection((host, port), timeout=timeout))

    @classmethod
    def login(
        cls, host: str, port: int, user: str, password: str, database: str, timeout: float = 30, **params: str
    ) -> RawConn:
        c = cls.open(host, port, timeout)
        c.send(startup({"user": user, "database": database, **params}))
        c.authenticate(user, password)
        return c

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise Closed(f"connection closed with {len(self.buf)} bytes pending")
            self.buf += chunk

    def recv(self) -> tuple[bytes, bytes]:
        """One message: (type byte, payload)."""
        self._fill(5)
        kind = bytes(self.buf[:1])
        (length,) = struct.unpack_from("!I", self.buf, 1)
        self._fill(1 + length)
        payload = bytes(self.buf[5 : 1 + length])
        del self.buf[: 1 + length]
        return kind, payload

    def messages(self) -> Iterator[tuple[bytes, bytes]]:
        while True:
            yield self.recv()

    def authenticate(self, user: str, password: str) -> None:
        client: scramp.ScramClient | None = None
        while True:
            kind, payload = self.recv()
            if kind == b"E":
                raise PgError(error_fields(payload))
            if kind == b"R":
                (code,) = struct.unpack_from("!I", payload)
                if code == 0:
                    break
                if code == 10:
                    client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
                    first = client.get_client_first().encode()
                    self.send(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
                elif code == 11 and client is not None:
                    client.set_server_first(payload[4:].decode())
                    self.send(msg(b"p", client.get_client_final().encode()))
                elif code == 12 and client is not None:
                    client.set_server_final(payload[4:].decode())
                else:
                    raise AssertionError(f"unexpected authentication request {code}")
        while True:
            kind, payload = self.recv()
            if kind == b"S":
                name, value = payload[:-1].split(b"\0", 1)
                self.params[name.decode()] = value.decode()
            elif kind == b"K":
                self.pid, self.secret = struct.unpack("!iI", payload)
            elif kind == b"Z":
                return
            elif kind == b"E":
                raise PgError(error_fields(payload))

    def until_ready(self) -> list[tuple[bytes, bytes]]:
        """Every message up to and including ReadyForQuery."""
        out = []
        while True:
            kind, payload = self.recv()
            out.append((kind, payload))
            if kind == b"Z":
                return out

    def simple(self, sql: str) -> list[list[bytes | None]]:
        """Run one simple query; the rows of its (last) result, or raise PgError."""
        self.send(query(sql))
        rows: list[list[bytes | None]] = []
        error: dict[str, str] | None = None
        for kind, payload in self.until_ready():
            if kind == b"T":
                rows = []
            elif kind == b"D":
                rows.append(data_row(payload))
            elif kind == b"E":
                error = error_fields(payload)
        if error is not None:
            raise PgError(error)
        return rows

    def read_error(self) -> dict[str, str]:
        """Read until an ErrorResponse (returned) or the connection closes (Closed)."""
        while True:
            kind, payload = self.recv()
            if kind == b"E":
                return error_fields(payload)

    def at_eof(self, timeout: float = 10) -> bool:
        """True when the server has closed the connection (after any pending bytes)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def data_row(payload: bytes) -> list[bytes | None]:
    (count,) = struct.unpack_from("!h", payload)
    pos = 2
    out: list[bytes | None] = []
    for _ in range(count):
        (ln,) = struct.unpack_from("!i", payload, pos)
        pos += 4
        if ln < 0:
            out.append(None)
        else:
            out.append(payload[pos : pos + ln])
            pos += ln
    return out


class PgError(Exception):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(f"{fields.get('C')}: {fields.get('M')}")
        self.fields = fields

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")
