"""DataRow rewriting: pure functions over PostgreSQL message payloads, no sockets.

DataRow payload: int16 column count, then per column int32 length (-1 = NULL) and that many
bytes. Only the columns that need it are decoded; a result with nothing to mask gets no
rewriter at all (`bind` returns None) so the proxy relays its DataRows as they came.

Replacement values must be valid for the column's type *and* format, or the client's decoder
breaks (asyncpg asks for binary):

* text-like types (text, varchar, bpchar, name, xml, enums, domains over text): the masked
  text, in either format (their binary form is the text);
* json: the masked text as a JSON string (`"[redacted]"`); jsonb the same, in binary format
  with its version byte 1 in front;
* every other type (integers, numeric, dates, uuid, arrays, records...) cannot carry a masked
  form: the value becomes NULL, in both formats.

NULL stays NULL for a masked column itself (its value is hidden, whether it has one is not). A
derived value (`nullif(ssn, '123-45-6789')`, `substring(ssn from '^1')`, `ssn::jsonb ->> 'x'`)
can be NULL *because of* the hidden value, so its NULL-ness is hidden too: it is always the
redacted text (json: `"[redacted]"`), or always NULL for types that cannot carry it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from typing import Any

from pgwarden.masking.catalog import JSON_OID, JSONB_OID, NON_TEXT_SCALARS, XML_OID, Catalog
from pgwarden.masking.copy import CopyRewriter
from pgwarden.masking.detectors import DetectorSet, tag
from pgwarden.masking.strategies import redact
from pgwarden.masking.view import MaskingView

# The RowDescription / DataRow codec is shared with the proxy (pgwarden.pgwire); re-exported here.
from pgwarden.pgwire import Field
from pgwarden.pgwire import build_data_row as build_data_row
from pgwarden.pgwire import build_row_description as build_row_description
from pgwarden.pgwire import parse_data_row as parse_data_row
from pgwarden.pgwire import parse_row_description as parse_row_description

Masker = Callable[[bytes | None], bytes | None]
Scanner = Callable[[bytes], bytes | None]

_NULL = b"\xff\xff\xff\xff"
_I16 = struct.Struct("!H")
_I32 = struct.Struct("!i")


def value_kind(type_oid: int, catalog: Catalog) -> str:
    """text | json | jsonb | other (cannot carry a masked form) | scalar (not scanned)."""
    if type_oid == JSON_OID:
        return "json"
    if type_oid == JSONB_OID:
        return "jsonb"
    if type_oid == XML_OID or catalog.is_text_type(type_oid):
        return "text"
    if type_oid in NON_TEXT_SCALARS:
        return "scalar"
    return "other"


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def make_masker(fn: Callable[[str], str | None], kind: str, fmt: int, hide_null: bool = False) -> Masker:
    """Apply a strategy to one column's raw value, keeping it valid for its type and format.

    `hide_null`: a NULL is masked like any value (derived expressions, whose NULL-ness can
    depend on the hidden value)."""
    if kind in ("other", "scalar"):
        return lambda raw: None
    if kind in ("json", "jsonb"):
        binary_jsonb = kind == "jsonb" and fmt == 1

        def mask_json(raw: bytes | None) -> bytes | None:
            if raw is None:
                if not hide_null:
                    return None
                raw = b"\x01null" if binary_jsonb else b"null"
            text = _decode(raw[1:] if binary_jsonb else raw)
            try:
                doc = json.loads(text)
            except ValueError:
                doc = None
            masked = fn(doc) if isinstance(doc, str) else fn(text)
            if masked is None:
                return None
            out = _encode(json.dumps(masked))
            return b"\x01" + out if binary_jsonb else out

        return mask_json

    def mask_text(raw: bytes | None) -> bytes | None:
        if raw is None:
            if not hide_null:
                return None
            raw = b""
        masked = fn(_decode(raw))
        return None if masked is None else _encode(masked)

    return mask_text


def scrub_json(doc: Any, dets: DetectorSet) -> tuple[Any, bool]:
    """Scrub every string (and number printed as text) inside a JSON document."""
    if isinstance(doc, str):
        s = dets.scrub(doc)
        return s, s is not doc
    if isinstance(doc, bool) or doc is None:
        return doc, False
    if isinstance(doc, int | float):
        text = str(doc)
        s = dets.scrub(text)
        return (s, True) if s is not text else (doc, False)
    if isinstance(doc, list):
        changed = False
        out = []
        for v in doc:
            nv, c = scrub_json(v, dets)
            out.append(nv)
            changed = changed or c
        return out, changed
    if isinstance(doc, dict):
        changed = False
        res = {}
        for k, v in doc.items():
            nk, ck = scrub_json(k, dets)
            nv, cv = scrub_json(v, dets)
            res[nk] = nv
            changed = changed or ck or cv
        return res, changed
    return doc, False


def make_scanner(kind: str, fmt: int, dets: DetectorSet) -> Scanner | None:
    """The detector pass for one column; returns the raw value itself when nothing matched."""
    if kind == "scalar":
        return None
    if kind in ("json", "jsonb"):
        binary_jsonb = kind == "jsonb" and fmt == 1

        def scan_json(raw: bytes) -> bytes | None:
            body = raw[1:] if binary_jsonb else raw
            if not dets.may_match(body):
                return raw
            text = _decode(body)
            try:
                doc = json.loads(text)
            except ValueError:
                s = dets.scrub(text)
                return raw if s is text else _encode(json.dumps(tag("json")))
            new, changed = scrub_json(doc, dets)
            if not changed:
                return raw
            out = _encode(json.dumps(new))
            return b"\x01" + out if binary_jsonb else out

        return scan_json
    if kind == "text" or fmt == 0:
        # text format of any type is its text; tags contain none of the characters that are
        # special in array or record literals
        def scan_text(raw: bytes) -> bytes | None:
            text = _decode(raw)
            s = dets.scrub(text)
            return raw if s is text else _encode(s)

        return scan_text

    def scan_binary(raw: bytes) -> bytes | None:  # arrays, records in binary: cannot edit inside
        if not dets.may_match(raw):
            return raw
        text = raw.decode("utf-8", "replace")
        return raw if dets.scrub(text) is text else None

    return scan_binary


class RowRewriter:
    """Rewrites the DataRows of one result. Columns without a masker or scanner are copied as
    bytes; columns after the last one of interest are not even walked."""

    __slots__ = ("maskers", "scanners", "dets", "ncols", "_mask_plan", "_scan_plan", "_pre")

    def __init__(self, ncols: int, maskers: dict[int, Masker], scanners: dict[int, Scanner],
                 dets: DetectorSet) -> None:
        self.ncols = ncols
        self.maskers = maskers
        self.scanners = scanners
        self.dets = dets
        last_mask = max(maskers) if maskers else -1
        last_any = max([*maskers, *scanners]) if (maskers or scanners) else -1
        # per column: (masker, scanner) or None, up to the last column of interest
        self._mask_plan: list[tuple[Masker | None, Scanner | None] | None] = [(maskers.get(i), None) if i in maskers else None for i in range(last_mask + 1)]
        self._scan_plan = [(maskers.get(i), scanners.get(i)) if (i in maskers or i in scanners) else None
                           for i in range(last_any + 1)]
        self._pre = dets.may_match

    def copy_data(self, payload: bytes) -> bytes:
        """CopyData reaching a row rewriter means the plan expected rows: redact every field."""
        n = payload.count(b"\t") + 1
        return CopyRewriter({i: (redact, True) for i in range(n)}, self.dets, {},
                            frozenset(range(n))).rewrite(payload)

    def rewrite(self, payload: bytes) -> bytes:
        if self.scanners and (self.maskers or self._pre(payload)):
            plan = self._scan_plan
            pre = self._pre
        elif self.maskers:
            plan = self._mask_plan
            pre = None
        else:
            return payload
        n = _I16.unpack_from(payload, 0)[0]
        pos = 2
        copied = 0  # payload[copied:pos] not yet emitted
        out: list[bytes] = []
        unpack = _I32.unpack_from
        for i in range(min(n, len(plan))):
            length = unpack(payload, pos)[0]
            start = pos + 4
            end = start + length if length > 0 else start
            todo = plan[i]
            if todo is None:
                pos = end
                continue
            masker, scanner = todo
            if masker is not None:
                new = masker(payload[start:end] if length >= 0 else None)
            else:
                if length <= 0 or scanner is None:
                    pos = end
                    continue
                raw = payload[start:end]
                if pre is not None and not pre(raw):
                    pos = end
                    continue
                new = scanner(raw)
                if new is raw:
                    pos = end
                    continue
            out.append(payload[copied:pos])
            if new is None:
                out.append(_NULL)
            else:
                out.append(_I32.pack(len(new)))
                out.append(new)
            copied = pos = end
        if not out:
            return payload
        out.append(payload[copied:])
        return b"".join(out)


def make_row_rewriter(actions: Sequence[str | None], fields: Sequence[Field], masking: MaskingView,
                      catalog: Catalog) -> RowRewriter | None:
    maskers: dict[int, Masker] = {}
    scanners: dict[int, Scanner] = {}
    dets = masking.detectors
    for i, (action, f) in enumerate(zip(actions, fields, strict=True)):
        kind = value_kind(f.type_oid, catalog)
        if action is not None:
            maskers[i] = make_masker(masking.strategy(action), kind, f.format, hide_null=action == "derived")
        elif dets:
            sc = make_scanner(kind, f.format, dets)
            if sc is not None:
                scanners[i] = sc
    if not maskers and not scanners:
        return None
    return RowRewriter(len(fields), maskers, scanners, dets)
