"""Masking the text of ErrorResponse and NoticeResponse fields.

PostgreSQL prints values in errors: a failed cast (`invalid input syntax for type integer:
"123-45-6789"`), a unique violation (`Key (email)=(ada@example.com) already exists.`), a
check or not-null violation (`Failing row contains (1, Ada, ada@example.com, …)`), and the XML,
JSON and date/number parsers echo their input in many more phrasings (`CONTEXT: JSON data, line
1: 123-45…`, `DETAIL: line 1: Start tag expected`, `invalid value "12" for "MM"`). An agent can
provoke them on purpose (`SELECT ssn::int FROM customers`), and a list of phrases cannot keep
up with every parser, so the rule depends on what the statement read:

* the statement's plan reads a masked column (in its result, a predicate, a cast — anywhere:
  `plan.touches_masked`): the message keeps its words up to the first colon, where PostgreSQL
  appends the offending input; what remains of quoted strings that are not catalog names and
  of numbers is replaced; DETAIL, HINT, CONTEXT / WHERE and the internal query are replaced in
  full. The SQLSTATE, the names of the schema, table, column and constraint stay, and the
  message says that the text was redacted and why;
* a plan that reads no masked column: `Key (cols)=(values)` is redacted when a key column is
  masked, `Failing row contains (…)` unless the error names a table the catalog knows to hold
  no masked column (itself, its parents and its children: the error names the partition),
  the quoted value of value-printing messages (invalid input syntax, out of range…);
* no plan at all: as above, and every quoted string that is not a catalog name is redacted too;
* detectors run over every text field as the safety net, always.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pgwarden.masking.strategies import REDACTED
from pgwarden.masking.view import MaskingView, PlanView

if TYPE_CHECKING:
    from pgwarden.masking.catalog import Catalog

TEXT_FIELDS = ("M", "D", "H", "W", "q")

_KEY = re.compile(r"(?P<head>Key \()(?P<cols>.*?)(?P<eq>\)=\()(?P<vals>.*)\)(?P<rest>[^()]*)$", re.DOTALL)
# a row that fits no partition: the partition key's values of the row (also an existing row's, on UPDATE)
_PARTITION_KEY = re.compile(r"(?P<head>Partition key of the failing row contains \()(?P<cols>.*?)(?P<eq>\) = \()"
                            r"(?P<vals>.*)\)(?P<rest>[^()]*)$", re.DOTALL)
_FAILING = re.compile(r"(Failing row contains \()(.*)(\)\.?)$", re.DOTALL)
_VALUE_MSG = re.compile(
    r"(?P<head>(?:invalid input syntax for(?: type)? [^:\"]+|invalid input value for [^:]+|"
    r"malformed [a-z ]+ literal|invalid [a-z ]+ value|value out of range|"
    r"[a-z/ ]*field value out of range|invalid hexadecimal digit|"
    r"invalid byte sequence for encoding [^:]+|unterminated [a-z ]+|"
    r"invalid regular expression|invalid escape string|could not parse)[^\"]*)\"(?P<val>(?:[^\"]|\"\")*)\"",
    re.IGNORECASE,
)
_VALUE_IS = re.compile(r"\b(value|Token|input) \"(?P<val>(?:[^\"]|\"\")*)\"")
_QUOTED = re.compile(r"\"((?:[^\"]|\"\")*)\"")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


def mask_error_fields(fields: Mapping[str, str], masking: MaskingView,
                      plan: PlanView | None = None, catalog: Catalog | None = None) -> dict[str, str]:
    out = dict(fields)
    table = fields.get("t", "")
    schema = fields.get("s", "")
    # a plan that cannot say what it read counts as reading masked data
    full = plan is not None and bool(getattr(plan, "touches_masked", True)) and masking.has_columns
    strict = plan is None or full
    names: set[str] = set()
    if catalog is not None and strict:
        for (s, n), rel in catalog.relations.items():
            names.update((n, s, f"{s}.{n}"))
            names.update(rel.columns)
    if full:
        return _redact_in_full(out, masking, names, catalog, getattr(plan, "masked_sources", frozenset()))
    for key in TEXT_FIELDS:
        text = out.get(key)
        if not text:
            continue
        new = _key_detail(text, masking, schema, table)
        new = _failing_row(new, masking, schema, table, catalog)
        if masking.has_columns:
            new = _VALUE_MSG.sub(lambda m: f"{m.group('head')}\"{REDACTED}\"", new)
            new = _VALUE_IS.sub(lambda m: f"{m.group(1)} \"{REDACTED}\"", new)
            if strict and key != "q":
                new = _QUOTED.sub(lambda m: m.group(0) if _is_name(m.group(1), names, catalog)
                                  else f"\"{REDACTED}\"", new)
        if masking.detectors:
            new = masking.detectors.scrub(new)
        out[key] = new
    return out


_NUMBER = re.compile(r"[-+]?[0-9][A-Za-z0-9_.+-]*")  # also after a letter: "ssn123-45-6789" keeps no digits
REDACTED_FIELDS = ("D", "H", "W", "q")


def _redact_in_full(out: dict[str, str], masking: MaskingView, names: set[str], catalog: Catalog | None,
                    sources: frozenset[str]) -> dict[str, str]:
    """The error of a statement that read masked data: keep what kind of error it was, not its values."""
    message = out.get("M")
    if message is not None:
        head = message.split(": ", 1)[0]
        head = _QUOTED.sub(lambda m: m.group(0) if _known_name(m.group(1), names, catalog)
                           else f"\"{REDACTED}\"", head)
        head = _NUMBER.sub("?", head)
        cols = ", ".join(sorted(sources)) or "a masked column"
        out["M"] = (f"{head} (pgwarden redacted the values in this error: the statement reads {cols}, "
                    "which the masking rule hides)")
    for key in REDACTED_FIELDS:
        if out.get(key):
            out[key] = REDACTED
    if masking.detectors:
        for key in TEXT_FIELDS:
            if out.get(key):
                out[key] = masking.detectors.scrub(out[key])
    return out


def _known_name(s: str, names: set[str], catalog: Catalog | None) -> bool:
    """Only what the catalog knows: a value that looks like an identifier is still a value."""
    return s == REDACTED or (catalog is not None and (s in names or s.lower() in names))


def _is_name(s: str, names: set[str], catalog: Catalog | None) -> bool:
    if s == REDACTED:
        return True
    if catalog is None:
        return bool(_WORD.fullmatch(s)) and s.islower()
    return s in names or s.lower() in names or (
        bool(_WORD.fullmatch(s)) and s.islower() and ("_" in s or s.endswith(("key", "pkey", "idx", "fkey"))))


def _key_detail(text: str, masking: MaskingView, schema: str, table: str) -> str:
    m = _KEY.search(text) or _PARTITION_KEY.search(text)
    if not m:
        return text
    cols = set(re.findall(r"[A-Za-z_][A-Za-z0-9_$]*", m.group("cols").lower()))
    if table and (schema, table) in masking.columns:
        masked = cols & set(masking.columns[(schema, table)])
    else:
        masked = cols & masking.masked_names
    if not masked and not (table and masking.detectors):
        return text
    if not masked:
        return text
    return f"{text[:m.start()]}{m.group('head')}{m.group('cols')}{m.group('eq')}{REDACTED}){m.group('rest')}"


def _failing_row(text: str, masking: MaskingView, schema: str, table: str, catalog: Catalog | None) -> str:
    m = _FAILING.search(text)
    if not m or not masking.has_columns:
        return text
    if table and schema and not _holds_masked(masking, catalog, schema, table):
        return text
    return f"{text[:m.start()]}{m.group(1)}{REDACTED}{m.group(3)}"


def _holds_masked(masking: MaskingView, catalog: Catalog | None, schema: str, table: str) -> bool:
    """Whether a row of schema.table can hold a masked value: a rule names it, or its parent or a
    child (PostgreSQL names the partition a failing row is in, not the table the rule names).
    True when the catalog cannot tell (none, or the table is not in it): fail closed."""
    if (schema, table) in masking.columns:
        return True
    rel = catalog.relations.get((schema, table)) if catalog is not None else None
    if rel is None:
        return True
    return any(masking.column_strategy(rel, column) is not None for column in rel.columns)
