"""Result-set messages of the PostgreSQL wire protocol (RowDescription, DataRow) as pure code.

Shared by the proxy's codec (`pgwarden.proxy.messages`) and the masking engine, which both read
and write these payloads; neither owns the other, so the format lives here, below both.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD_TAIL = struct.Struct("!IhIhih")
_NULL = _I32.pack(-1)


class Field(NamedTuple):
    """One RowDescription field, as PostgreSQL sends it."""

    name: str
    table_oid: int
    attnum: int
    type_oid: int
    typlen: int
    typmod: int
    format: int


def parse_row_description(payload: bytes | memoryview) -> tuple[Field, ...]:
    # a session sends the same few result shapes again and again: parse each once (small ones),
    # and hand out the same tuple each time (the masking plan binds its row rewriter to it by identity)
    data = bytes(payload)
    return _parse_cached(data) if len(data) <= 4096 else _parse_row_description(data)


@lru_cache(maxsize=512)
def _parse_cached(data: bytes) -> tuple[Field, ...]:
    return _parse_row_description(data)


def _parse_row_description(data: bytes) -> tuple[Field, ...]:
    (count,) = _I16.unpack_from(data, 0)
    pos = 2
    out = []
    for _ in range(count):
        end = data.index(b"\0", pos)
        name = data[pos:end].decode("utf-8", "replace")
        pos = end + 1
        out.append(Field(name, *_FIELD_TAIL.unpack_from(data, pos)))
        pos += _FIELD_TAIL.size
    return tuple(out)


def build_row_description(fields: Sequence[Field]) -> bytes:
    parts = [_I16.pack(len(fields))]
    for f in fields:
        parts.append(f.name.encode() + b"\0")
        parts.append(_FIELD_TAIL.pack(f.table_oid, f.attnum, f.type_oid, f.typlen, f.typmod, f.format))
    return b"".join(parts)


def parse_data_row(payload: bytes | memoryview) -> list[bytes | None]:
    data = bytes(payload)
    (count,) = _I16.unpack_from(data, 0)
    pos = 2
    out: list[bytes | None] = []
    for _ in range(count):
        (length,) = _I32.unpack_from(data, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(data[pos : pos + length])
            pos += length
    return out


def build_data_row(values: Sequence[bytes | None]) -> bytes:
    parts = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(_NULL)
        else:
            parts.append(_I32.pack(len(v)))
            parts.append(v)
    return b"".join(parts)
