"""PostgreSQL v3 wire messages as pure functions over bytes: framing, parsing, building.

No sockets here, so the proxy's protocol handling is testable byte for byte. Reference:
https://www.postgresql.org/docs/current/protocol-message-formats.html

Hot-path note: framing uses a precompiled `struct` and never copies a message it does not need
to look into; callers pass `memoryview`s or slices only where they decode.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from pgwarden.errors import AgentError
from pgwarden.pgwire import Field as Field  # re-exported: the relay reads results through this codec
from pgwarden.pgwire import parse_data_row as parse_data_row
from pgwarden.pgwire import parse_row_description as parse_row_description

PROTOCOL_3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

I32 = struct.Struct("!i")
U32 = struct.Struct("!I")
I16 = struct.Struct("!h")
# Counts in Parse and Bind (parameter types, format codes, parameters, result formats) are
# unsigned 16-bit, as PostgreSQL reads them (pq_getmsgint(msg, 2)): up to 65,535 parameters.
U16 = struct.Struct("!H")
HEADER = struct.Struct("!cI")
_unpack_len = U32.unpack_from

# Frontend (client -> server) message types
F_QUERY: Final[bytes] = b"Q"
F_PARSE: Final[bytes] = b"P"
F_BIND: Final[bytes] = b"B"
F_DESCRIBE: Final[bytes] = b"D"
F_EXECUTE: Final[bytes] = b"E"
F_CLOSE: Final[bytes] = b"C"
F_SYNC: Final[bytes] = b"S"
F_FLUSH: Final[bytes] = b"H"
F_TERMINATE: Final[bytes] = b"X"
F_FUNCTION_CALL: Final[bytes] = b"F"
F_COPY_DATA: Final[bytes] = b"d"
F_COPY_DONE: Final[bytes] = b"c"
F_COPY_FAIL: Final[bytes] = b"f"
F_PASSWORD: Final[bytes] = b"p"
FRONTEND_TYPES = frozenset(b"QPBDECSHXFdcfp")

# Backend (server -> client) message types
B_AUTH: Final[bytes] = b"R"
B_KEY_DATA: Final[bytes] = b"K"
B_PARAM_STATUS: Final[bytes] = b"S"
B_READY: Final[bytes] = b"Z"
B_ROW_DESCRIPTION: Final[bytes] = b"T"
B_DATA_ROW: Final[bytes] = b"D"
B_COMMAND_COMPLETE: Final[bytes] = b"C"
B_EMPTY_QUERY: Final[bytes] = b"I"
B_ERROR: Final[bytes] = b"E"
B_NOTICE: Final[bytes] = b"N"
B_NOTIFICATION: Final[bytes] = b"A"
B_PARSE_COMPLETE: Final[bytes] = b"1"
B_BIND_COMPLETE: Final[bytes] = b"2"
B_CLOSE_COMPLETE: Final[bytes] = b"3"
B_PARAM_DESCRIPTION: Final[bytes] = b"t"
B_NO_DATA: Final[bytes] = b"n"
B_PORTAL_SUSPENDED: Final[bytes] = b"s"
B_COPY_IN: Final[bytes] = b"G"
B_COPY_OUT: Final[bytes] = b"H"
B_COPY_BOTH: Final[bytes] = b"W"
B_COPY_DATA: Final[bytes] = b"d"
B_COPY_DONE: Final[bytes] = b"c"
B_NEGOTIATE_VERSION = b"v"

AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5 = 0, 3, 5
AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 10, 11, 12


# -- framing -------------------------------------------------------------------------------
class FrameError(Exception):
    """The peer sent bytes that are not a valid message stream."""


def frames(buf: bytes, start: int, max_len: int) -> Iterator[tuple[int, int, int]]:
    """Yield (type byte, payload start, message end) for each complete message from `start`.

    Stops at the first incomplete message; the caller keeps the bytes from the last `end`.
    Raises FrameError for a length below 4 or above `max_len` (a huge length prefix must not
    make the proxy buffer gigabytes before noticing). `bytes` only, and the length read byte by
    byte: indexing bytes is native code when compiled, a struct call is not (every message).
    """
    n = len(buf)
    pos = start
    while n - pos >= 5:
        length = (buf[pos + 1] << 24) | (buf[pos + 2] << 16) | (buf[pos + 3] << 8) | buf[pos + 4]
        if length < 4 or length > max_len:
            raise FrameError(f"message length {length} out of range (limit {max_len} bytes)")
        end = pos + 1 + length
        if end > n:
            return
        yield buf[pos], pos + 5, end
        pos = end


def message(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + U32.pack(len(payload) + 4) + payload


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


# -- startup packets -----------------------------------------------------------------------
@dataclass(frozen=True)
class StartupPacket:
    code: int
    params: dict[str, str]
    # CancelRequest fields
    pid: int = 0
    secret: int = 0


def startup_length(buf: bytes | bytearray) -> int | None:
    """Length of the untyped startup packet at the start of buf, or None if incomplete."""
    if len(buf) < 4:
        return None
    return int(_unpack_len(buf, 0)[0])


def parse_startup(packet: bytes) -> StartupPacket:
    """Parse an untyped startup packet (length included)."""
    if len(packet) < 8:
        raise FrameError("startup packet too short")
    code = _unpack_len(packet, 4)[0]
    if code == CANCEL_REQUEST:
        if len(packet) != 16:
            raise FrameError("malformed CancelRequest")
        pid, secret = struct.unpack_from("!iI", packet, 8)
        return StartupPacket(code, {}, pid, secret)
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        if len(packet) != 8:
            raise FrameError("malformed SSL/GSS request")
        return StartupPacket(code, {})
    if code >> 16 != 3:
        major, minor = code >> 16, code & 0xFFFF
        raise FrameError(f"unsupported frontend protocol {major}.{minor}: pgwarden speaks 3.0")
    # a newer 3.x minor is answered with NegotiateProtocolVersion, as PostgreSQL does
    body = packet[8:]
    if body == b"\0":
        parts: list[bytes] = []
    elif body.endswith(b"\0\0"):
        parts = body[:-2].split(b"\0")
    else:
        raise FrameError("startup parameters are not terminated")
    if len(parts) % 2:
        raise FrameError("startup parameters are not name/value pairs")
    params: dict[str, str] = {}
    for i in range(0, len(parts), 2):
        params[parts[i].decode("utf-8", "replace")] = parts[i + 1].decode("utf-8", "replace")
    return StartupPacket(code, params)


def build_startup(params: Mapping[str, str]) -> bytes:
    body = U32.pack(PROTOCOL_3) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return U32.pack(len(body) + 4) + body


def build_cancel(pid: int, secret: int) -> bytes:
    return struct.pack("!IIiI", 16, CANCEL_REQUEST, pid, secret)


def build_ssl_request() -> bytes:
    return struct.pack("!II", 8, SSL_REQUEST)


# -- backend messages the proxy builds -----------------------------------------------------
def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(B_AUTH, U32.pack(code) + data)


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    return auth_request(AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\0")


def negotiate_protocol_version(unrecognized: Iterable[str], version: int = PROTOCOL_3) -> bytes:
    """The newest protocol we speak (as PostgreSQL sends it: major << 16 | minor, whatever the
    docs' "minor" says), and the `_pq_.` startup options we ignored."""
    names = list(unrecognized)
    return message(B_NEGOTIATE_VERSION, U32.pack(version) + U32.pack(len(names)) + b"".join(cstr(n) for n in names))


def parameter_status(name: str, value: str) -> bytes:
    return message(B_PARAM_STATUS, cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(B_KEY_DATA, struct.pack("!iI", pid, secret))


def ready_for_query(status: bytes) -> bytes:
    return message(B_READY, status)


def error_fields(
    severity: str, sqlstate: str, text: str, *, detail: str = "", hint: str = "", extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": text}
    if detail:
        fields["D"] = detail
    if hint:
        fields["H"] = hint
    if extra:
        fields.update(extra)
    return fields


def build_fields(kind: bytes, fields: Mapping[str, str]) -> bytes:
    body = b"".join(k.encode() + cstr(v) for k, v in fields.items() if v is not None) + b"\0"
    return message(kind, body)


def error_response(
    sqlstate: str, text: str, *, severity: str = "ERROR", detail: str = "", hint: str = ""
) -> bytes:
    return build_fields(B_ERROR, error_fields(severity, sqlstate, text, detail=detail, hint=hint))


def error_response_from(err: AgentError) -> bytes:
    """The one place an AgentError becomes an ErrorResponse."""
    return error_response(err.sqlstate, err.message, severity=err.severity, detail=err.detail, hint=err.hint)


def notice_response(text: str, *, detail: str = "", hint: str = "", sqlstate: str = "00000") -> bytes:
    return build_fields(B_NOTICE, error_fields("NOTICE", sqlstate, text, detail=detail, hint=hint))


def parse_fields(payload: bytes | memoryview) -> dict[str, str]:
    """Fields of an ErrorResponse / NoticeResponse payload."""
    data = bytes(payload)
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        code = chr(data[pos])
        end = data.find(b"\0", pos + 1)
        if end < 0:
            raise FrameError("unterminated error field")
        out[code] = data[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return out


# -- frontend messages the proxy reads -----------------------------------------------------
def parse_query(payload: bytes | memoryview) -> str:
    data = bytes(payload)
    if not data.endswith(b"\0"):
        raise FrameError("Query text is not terminated")
    return data[:-1].decode("utf-8", "replace")


@dataclass(frozen=True)
class ParseMsg:
    name: str
    query: str
    param_types: tuple[int, ...]


def parse_parse(payload: bytes | memoryview) -> ParseMsg:
    data = bytes(payload)
    n1 = data.find(b"\0")
    n2 = data.find(b"\0", n1 + 1) if n1 >= 0 else -1
    if n1 < 0 or n2 < 0 or len(data) < n2 + 3:
        raise FrameError("malformed Parse message")
    count = U16.unpack_from(data, n2 + 1)[0]
    if len(data) != n2 + 3 + 4 * count:
        raise FrameError("malformed Parse parameter types")
    types = struct.unpack_from(f"!{count}I", data, n2 + 3) if count else ()
    return ParseMsg(
        data[:n1].decode("utf-8", "replace"), data[n1 + 1 : n2].decode("utf-8", "replace"), tuple(types)
    )


def parse_text_span(buf: bytes, ps: int, end: int) -> tuple[int, int]:
    """(start, byte length) of the query text of the Parse message in buf[ps:end], without
    copying it (the whole payload when it is malformed: parse_parse then says what is wrong)."""
    n1 = buf.find(b"\0", ps, end)
    n2 = buf.find(b"\0", n1 + 1, end) if n1 >= 0 else -1
    return (n1 + 1, n2 - n1 - 1) if n2 >= 0 else (ps, end - ps)


class BindMsg:
    """A Bind message, as read (never changed once made). A plain class, not a frozen dataclass:
    every Bind makes one (see pgwarden/compiled.py)."""

    __slots__ = ("portal", "statement", "param_formats", "params", "result_formats")

    def __init__(self, portal: str, statement: str, param_formats: tuple[int, ...], params: tuple[bytes | None, ...],
                 result_formats: tuple[int, ...]) -> None:
        self.portal = portal
        self.statement = statement
        self.param_formats = param_formats
        self.params = params
        self.result_formats = result_formats


def _text(data: bytes, start: int, end: int) -> str:
    """A name from a message (the unnamed statement or portal, most often: no decode)."""
    return data[start:end].decode("utf-8", "replace") if end > start else ""


def _int16s(data: bytes, pos: int, n: int) -> tuple[int, ...]:
    """`n` format codes (Int16) from `pos`: none or one (what drivers send: all text, or one code
    for all) read byte by byte, compiled native code; more with one struct call."""
    if n == 0:
        return ()
    if n == 1:
        if pos + 2 > len(data):
            raise FrameError("malformed Bind message: format codes cut off")
        v = data[pos] << 8 | data[pos + 1]
        return (v - 0x10000 if v >= 0x8000 else v,)
    return struct.unpack_from(f"!{n}h", data, pos)


def parse_bind(payload: bytes | memoryview) -> BindMsg:
    data = bytes(payload)
    try:
        n1 = data.index(b"\0")
        n2 = data.index(b"\0", n1 + 1)
        pos = n2 + 1
        # counts and lengths read byte by byte: compiled (mypyc) that is native code, where
        # Struct.unpack_from is a call and a tuple per field (every Bind of every statement)
        nf = data[pos] << 8 | data[pos + 1]
        pos += 2
        fmts = _int16s(data, pos, nf)
        pos += 2 * nf
        np_ = data[pos] << 8 | data[pos + 1]
        pos += 2
        params: list[bytes | None] = []
        for _ in range(np_):
            if pos + 4 > len(data):
                raise FrameError("malformed Bind parameter")
            ln = data[pos] << 24 | data[pos + 1] << 16 | data[pos + 2] << 8 | data[pos + 3]
            pos += 4
            if ln == 0xFFFFFFFF:  # -1: NULL
                params.append(None)
            else:
                if ln >= 0x80000000 or pos + ln > len(data):
                    raise FrameError("malformed Bind parameter")
                params.append(data[pos : pos + ln])
                pos += ln
        nr = data[pos] << 8 | data[pos + 1]
        pos += 2
        rfmts = _int16s(data, pos, nr)
        pos += 2 * nr
    except (ValueError, IndexError, struct.error) as e:
        raise FrameError(f"malformed Bind message: {e}") from e
    if pos != len(data):
        raise FrameError("malformed Bind message")
    return BindMsg(
        _text(data, 0, n1), _text(data, n1 + 1, n2),
        tuple(fmts), tuple(params), tuple(rfmts),
    )


def parse_target(payload: bytes | memoryview) -> tuple[str, str]:
    """Describe / Close: ('S' or 'P', name)."""
    data = bytes(payload)
    if len(data) < 2 or data[0:1] not in (b"S", b"P") or not data.endswith(b"\0"):
        raise FrameError("malformed Describe/Close message")
    return chr(data[0]), data[1:-1].decode("utf-8", "replace")


def parse_execute(payload: bytes | memoryview) -> tuple[str, int]:
    """(portal name, maximum rows: 0 for all). The row limit read byte by byte, as in parse_bind."""
    data = bytes(payload)
    n = data.find(b"\0")
    if n < 0 or len(data) != n + 5:
        raise FrameError("malformed Execute message")
    rows = data[n + 1] << 24 | data[n + 2] << 16 | data[n + 3] << 8 | data[n + 4]
    if rows >= 0x80000000:  # an Int32: negative (the server treats it as no limit)
        rows -= 0x100000000
    return _text(data, 0, n), rows


# -- backend messages the proxy reads ------------------------------------------------------
def command_tag_rows(tag: str) -> int | None:
    """Row count from a CommandComplete tag ('SELECT 5', 'INSERT 0 3', 'UPDATE 2')."""
    head, _, last = tag.rpartition(" ")  # per statement: no list of parts
    if head and last.isascii() and last.isdigit():
        return int(last)
    return None
