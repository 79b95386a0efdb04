"""MaskingRule documents -> typed rules (`ruleset.MaskingSet` holds them all).

The proxy asks the set once per session for the `SubjectMasking` of the authenticated caller on
one connection: the union of the rules for that connection that do not exempt the caller. Several rules for one
connection merge, and where they disagree the stricter setting wins (deny over redact, the
predicate ban over the permission), because the agent is the adversary and two documents
should never add up to less protection than either.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pgwarden.masking import detectors as det
from pgwarden.masking.strategies import STRATEGIES
from pgwarden.resources import Document, get_field
from pgwarden.subjects import SubjectRef, parse_subjects

POLICIES = ("redact", "deny")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")

# strictness order used when two rules name the same column: the later entry is stronger
_STRATEGY_STRENGTH = {"hash": 0, "partial": 1, "email": 1, "last4": 1, "redact": 2, "null": 3}


@dataclass(frozen=True)
class ColumnRule:
    schema: str
    table: str
    column: str
    strategy: str


@dataclass(frozen=True)
class MaskingRule:
    """One MaskingRule document, checked."""

    name: str
    namespace: str
    connection: str
    columns: tuple[ColumnRule, ...] = ()
    detectors: tuple[det.Detector, ...] = ()
    derived: str = "redact"
    whole_row: str = "redact"
    allow_in_predicates: bool = False
    exempt: tuple[SubjectRef, ...] = ()
    hash_key: bytes | None = None


def parse_masking_rule(doc: Document, env: Mapping[str, str] | None = None) -> MaskingRule:
    s = doc.spec
    ref = get_field(doc, s, "connectionRef", Mapping, "spec.connectionRef")
    connection = get_field(doc, ref, "name", str, "spec.connectionRef.name")

    columns: list[ColumnRule] = []
    raw_cols = get_field(doc, s, "columns", list, "spec.columns", [])
    for i, item in enumerate(raw_cols):
        p = f"spec.columns[{i}]"
        if not isinstance(item, Mapping):
            raise doc.error(p, "must be a mapping {table: schema.table, column: NAME, strategy: ...}")
        unknown = set(item) - {"table", "column", "strategy"}
        if unknown:
            raise doc.error(p, f"unknown field(s) {', '.join(sorted(unknown))}")
        table = get_field(doc, item, "table", str, f"{p}.table")
        parts = table.split(".")
        if len(parts) != 2 or not all(_IDENT.fullmatch(x) for x in parts):
            raise doc.error(f"{p}.table", f"{table!r} must be written schema.table, e.g. public.customers")
        column = get_field(doc, item, "column", str, f"{p}.column")
        if not _IDENT.fullmatch(column):
            raise doc.error(f"{p}.column", f"{column!r} is not a column name")
        strategy = get_field(doc, item, "strategy", str, f"{p}.strategy", "redact")
        if strategy not in STRATEGIES:
            raise doc.error(f"{p}.strategy", f"{strategy!r} is not one of {', '.join(STRATEGIES)}")
        # PostgreSQL folds unquoted identifiers to lower case; rules name columns as written in SQL
        columns.append(ColumnRule(parts[0].lower(), parts[1].lower(), column.lower(), strategy))

    detectors: list[det.Detector] = []
    raw_det = get_field(doc, s, "detectors", list, "spec.detectors", [])
    for i, item in enumerate(raw_det):
        p = f"spec.detectors[{i}]"
        if isinstance(item, str):
            if item not in det.BUILTIN_DETECTORS:
                raise doc.error(p, f"unknown detector {item!r}; built-in: {', '.join(det.BUILTIN_DETECTORS)}")
            detectors.append(det.builtin(item))
        elif isinstance(item, Mapping):
            name = get_field(doc, item, "name", str, f"{p}.name")
            regex = get_field(doc, item, "regex", str, f"{p}.regex")
            if not regex.isascii():
                raise doc.error(f"{p}.regex", "must be ASCII (write non-ASCII characters as \\uXXXX)")
            try:
                detectors.append(det.custom(name, regex))
            except re.error as e:
                raise doc.error(f"{p}.regex", f"does not compile: {e}") from e
        else:
            raise doc.error(p, "must be a built-in detector name or {name: ..., regex: ...}")
    derived = get_field(doc, s, "derived", str, "spec.derived", "redact")
    if derived not in POLICIES:
        raise doc.error("spec.derived", f"{derived!r} is not one of redact, deny")
    whole_row = get_field(doc, s, "wholeRow", str, "spec.wholeRow", "redact")
    if whole_row not in POLICIES:
        raise doc.error("spec.wholeRow", f"{whole_row!r} is not one of redact, deny")
    allow_pred = get_field(doc, s, "allowInPredicates", bool, "spec.allowInPredicates", False)
    exempt = parse_subjects(doc, s.get("exemptSubjects"), "spec.exemptSubjects")

    key = _hash_key(doc, env if env is not None else os.environ)
    if key is None and any(c.strategy == "hash" for c in columns):
        raise doc.error("spec.hashKeyEnv", "a column uses strategy hash: set hashKeyEnv or hashKeyFile")
    known = {"connectionRef", "columns", "detectors", "derived", "wholeRow",
             "allowInPredicates", "exemptSubjects", "hashKeyEnv", "hashKeyFile"}
    extra = set(s) - known
    if extra:
        raise doc.error("spec", f"unknown field(s) {', '.join(sorted(extra))}")
    return MaskingRule(
        name=doc.name,
        namespace=doc.namespace,
        connection=connection,
        columns=tuple(columns),
        detectors=tuple(detectors),
        derived=derived,
        whole_row=whole_row,
        allow_in_predicates=allow_pred,
        exempt=exempt,
        hash_key=key,
    )


def _hash_key(doc: Document, env: Mapping[str, str]) -> bytes | None:
    env_name = get_field(doc, doc.spec, "hashKeyEnv", str, "spec.hashKeyEnv", "")
    file_name = get_field(doc, doc.spec, "hashKeyFile", str, "spec.hashKeyFile", "")
    if env_name and file_name:
        raise doc.error("spec.hashKeyFile", "set either hashKeyEnv or hashKeyFile, not both")
    if env_name:
        value = env.get(env_name, "")
        if len(value) < 16:
            raise doc.error("spec.hashKeyEnv", f"environment variable {env_name} must hold at least 16 characters")
        return value.encode()
    if file_name:
        try:
            data = Path(file_name).read_bytes().strip()
        except OSError as e:
            raise doc.error("spec.hashKeyFile", f"cannot read {file_name}: {e.strerror}") from e
        if len(data) < 16:
            raise doc.error("spec.hashKeyFile", f"{file_name} must hold at least 16 bytes")
        return data
    return None


def strongest(a: str, b: str) -> str:
    if a == b:
        return a
    return a if _STRATEGY_STRENGTH[a] > _STRATEGY_STRENGTH[b] else b

