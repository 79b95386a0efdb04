"""CopyData rewriting for COPY … TO STDOUT in text and CSV format.

PostgreSQL sends one CopyData message per row for COPY TO, so each payload is one line: in
text format fields are separated by the delimiter (tab) with backslash escapes, `\\N` is NULL;
in CSV fields may be quoted (embedded delimiters, quotes, even newlines stay inside the one
message), an unquoted empty field is NULL. Binary COPY with masked columns is refused by the
plan, so it never reaches here.

Masked fields are re-emitted in the same dialect; the NULL string stands for masked values of
types that cannot carry masked text (as for DataRows). A NULL stays NULL for a masked column and
is masked like a value for a derived one (its NULL-ness can depend on the hidden value).
Detectors run over every field of rows whose raw bytes pass the prefilter. The header line
(HEADER, read as the server reads the option) carries names only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pgwarden.masking.catalog import NON_TEXT_SCALARS
from pgwarden.masking.detectors import DetectorSet
from pgwarden.masking.view import MaskingView

Fn = Callable[[str], str | None]

_TEXT_UNESCAPE = re.compile(r"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.DOTALL)
_SIMPLE = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def text_unescape(field: str) -> str:
    if "\\" not in field:
        return field

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return chr(int(m.group(1), 8))
        if m.group(2):
            return chr(int(m.group(2), 16))
        c = m.group(3)
        return _SIMPLE.get(c, c)

    return _TEXT_UNESCAPE.sub(sub, field)


def text_escape(value: str, delim: str) -> str:
    out = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    if delim not in "\\\n\r\t":
        out = out.replace(delim, "\\" + delim)
    return out


def split_text(line: str, delim: str) -> list[str]:
    """Split on delimiters that are not escaped by a backslash."""
    if "\\" not in line:
        return line.split(delim)
    fields: list[str] = []
    cur: list[str] = []
    i = 0
    n = len(line)
    while i < n:
        c = line[i]
        if c == "\\" and i + 1 < n:
            cur.append(line[i:i + 2])
            i += 2
            continue
        if c == delim:
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    fields.append("".join(cur))
    return fields


def split_csv(line: str, delim: str, quote: str, escape: str) -> list[tuple[str, bool]]:
    """(value, was_quoted) per field of one CSV record."""
    fields: list[tuple[str, bool]] = []
    i = 0
    n = len(line)
    while True:
        if i < n and line[i] == quote:
            i += 1
            buf: list[str] = []
            while i < n:
                c = line[i]
                if c == escape and i + 1 < n and line[i + 1] == quote:
                    buf.append(quote)
                    i += 2
                elif c == escape and escape != quote and i + 1 < n and line[i + 1] == escape:
                    buf.append(escape)
                    i += 2
                elif c == quote:
                    i += 1
                    break
                else:
                    buf.append(c)
                    i += 1
            # anything up to the delimiter after a closing quote belongs to the field as well
            j = line.find(delim, i)
            j = n if j < 0 else j
            buf.append(line[i:j])
            fields.append(("".join(buf), True))
            i = j
        else:
            j = line.find(delim, i)
            j = n if j < 0 else j
            fields.append((line[i:j], False))
            i = j
        if i >= n:
            break
        i += 1  # the delimiter
        if i == n:
            fields.append(("", False))
            break
    return fields


class CopyRewriter:
    """Rewrites the CopyData rows of one COPY … TO STDOUT."""

    def __init__(self, maskers: dict[int, tuple[Fn, bool]], dets: DetectorSet, options: Mapping[str, Any],
                 hide_null: frozenset[int] = frozenset()) -> None:
        self.maskers = maskers  # index -> (strategy, can carry text)
        self.hide_null = hide_null  # indexes whose NULLs are masked like values
        self.dets = dets
        self.csv = options.get("format") == "csv"
        self.delim = str(options.get("delimiter") or ("," if self.csv else "\t"))
        self.null = str(options.get("null", "" if self.csv else "\\N"))
        self.quote = str(options.get("quote") or '"')
        self.escape = str(options.get("escape") or self.quote)
        # the plan read HEADER as the server does (lineage.copy_options) and refused other values
        self._skip_header = options.get("header", False) is True

    def rewrite(self, payload: bytes) -> bytes:
        if self._skip_header:
            self._skip_header = False
            return payload
        scan = bool(self.dets) and self.dets.may_match(payload)
        if not self.maskers and not scan:
            return payload
        line = payload.decode("utf-8", "surrogateescape")
        eol = ""
        for e in ("\r\n", "\n"):
            if line.endswith(e):
                line, eol = line[: -len(e)], e
                break
        out = self._csv(line, scan) if self.csv else self._text(line, scan)
        if out is None:
            return payload
        return (out + eol).encode("utf-8", "surrogateescape")

    copy_data = rewrite

    def _text(self, line: str, scan: bool) -> str | None:
        raw = split_text(line, self.delim)
        changed = False
        for i, f in enumerate(raw):
            m = self.maskers.get(i)
            if m is not None:
                if f == self.null and i not in self.hide_null:
                    continue
                fn, texty = m
                v = fn("" if f == self.null else text_unescape(f)) if texty else None
                raw[i] = self.null if v is None else text_escape(v, self.delim)
                changed = True
            elif scan and f != self.null:
                value = text_unescape(f)
                s = self.dets.scrub(value)
                if s is not value:
                    raw[i] = text_escape(s, self.delim)
                    changed = True
        return self.delim.join(raw) if changed else None

    def _quote(self, v: str) -> str:
        q, e = self.quote, self.escape
        body = v.replace(e, e + e) if e != q else v
        return q + body.replace(q, e + q) + q

    def _csv(self, line: str, scan: bool) -> str | None:
        fields = split_csv(line, self.delim, self.quote, self.escape)
        out: list[str] = []
        changed = False
        for i, (v, quoted) in enumerate(fields):
            is_null = not quoted and v == self.null
            m = self.maskers.get(i)
            if m is not None:
                if is_null and i not in self.hide_null:
                    out.append(self.null)
                    continue
                fn, texty = m
                nv = fn("" if is_null else v) if texty else None
                out.append(self.null if nv is None else self._quote(nv))
                changed = True
                continue
            if scan and not is_null:
                s = self.dets.scrub(v)
                if s is not v:
                    out.append(self._quote(s))
                    changed = True
                    continue
            out.append(self._quote(v) if quoted else v)
        return self.delim.join(out) if changed else None


def make_copy_rewriter(actions: Sequence[str | None], types: Sequence[int], options: Mapping[str, Any],
                       masking: MaskingView) -> CopyRewriter | None:
    maskers = {
        i: (masking.strategy(a), types[i] not in NON_TEXT_SCALARS)
        for i, a in enumerate(actions)
        if a is not None
    }
    if not maskers and not masking.detectors:
        return None
    hide_null = frozenset(i for i, a in enumerate(actions) if a == "derived")
    return CopyRewriter(maskers, masking.detectors, options, hide_null)
