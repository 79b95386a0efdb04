"""Masking the text of ErrorResponse and NoticeResponse fields.

PostgreSQL prints values in errors: a failed cast (`invalid input syntax for type integer:
"123-45-6789"`), a unique violation (`Key (email)=(ada@example.com) already exists.`), a
check or not-null violation (`Failing row contains (1, Ada, ada@example.com, …)`). An agent
can provoke them on purpose (`SELECT ssn::int FROM customers`), so:

* `Key (cols)=(values)`: the values are redacted when any key column is masked;
* `Failing row contains (…)`: redacted unless the error names a table without masked columns;
* messages of the value-printing kinds (invalid input syntax / value / literal, out of range…):
  the quoted value is redacted;
* when the statement's plan touched masked data, every other quoted string that is not a name
  the catalog knows (relation, column) is redacted too;
* detectors run over all text fields as the safety net.

Only fields that hold free text are touched (M message, D detail, H hint, W where/context,
q internal query, p… are numbers or names and stay).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pgwarden.masking.strategies import REDACTED

if TYPE_CHECKING:
    from pgwarden.masking.catalog import Catalog
    from pgwarden.masking.subject import StatementPlan, SubjectMasking

TEXT_FIELDS = ("M", "D", "H", "W", "q")

_KEY = re.compile(r"Key \((?P<cols>.*?)\)=\((?P<vals>.*)\)(?P<rest>[^()]*)$", re.DOTALL)
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


def mask_error_fields(fields: Mapping[str, str], masking: SubjectMasking,
                      plan: StatementPlan | None = None, catalog: Catalog | None = None) -> dict[str, str]:
    out = dict(fields)
    table = fields.get("t", "")
    schema = fields.get("s", "")
    strict = plan is None or plan.touches_masked
    names: set[str] = set()
    if catalog is not None and strict:
        for (s, n), rel in catalog.relations.items():
            names.update((n, s, f"{s}.{n}"))
            names.update(rel.columns)
    for key in TEXT_FIELDS:
        text = out.get(key)
        if not text:
            continue
        new = _key_detail(text, masking, schema, table)
        new = _failing_row(new, masking, schema, table)
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


def _is_name(s: str, names: set[str], catalog: Catalog | None) -> bool:
    if s == REDACTED:
        return True
    if catalog is None:
        return bool(_WORD.fullmatch(s)) and s.islower()
    return s in names or s.lower() in names or (
        bool(_WORD.fullmatch(s)) and s.islower() and ("_" in s or s.endswith(("key", "pkey", "idx", "fkey"))))


def _key_detail(text: str, masking: SubjectMasking, schema: str, table: str) -> str:
    m = _KEY.search(text)
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
    return f"{text[:m.start()]}Key ({m.group('cols')})=({REDACTED}){m.group('rest')}"


def _failing_row(text: str, masking: SubjectMasking, schema: str, table: str) -> str:
    m = _FAILING.search(text)
    if not m or not masking.has_columns:
        return text
    if table and schema and (schema, table) not in masking.columns:
        return text
    return f"{text[:m.start()]}{m.group(1)}{REDACTED}{m.group(3)}"
