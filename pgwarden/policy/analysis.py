"""What a SQL text would do, read from PostgreSQL's own parse tree.

The text is parsed by libpg_query (pglast) — the server's grammar, so comments, dollar quotes,
escape strings, quoting, case and `U&"…"` escapes are resolved exactly as the server resolves
them — and the whole tree is walked: DML hidden in CTEs, EXPLAIN ANALYZE, PREPARE bodies,
INSERT … SELECT sources, COPY queries, sequence functions, locking clauses. The result is a
policy-independent `Analysis`: per statement, the accesses (operation on object), the
functions called, the built-in violations (things no policy may allow) and the session
effects. `engine.py` decides it against the policies.

We use `parse_sql_json` + `json.loads` rather than pglast's AST objects: the same tree for about
a fifth of the cost (docs/policy.md has the figures). Every statement type must be listed in
`_STATEMENTS`; one that is not is a violation, so a new PostgreSQL statement is denied until
someone teaches the engine about it.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

from pglast.parser import ParseError, parse_sql_json

from pgwarden.cache import BoundedCache
from pgwarden.policy import functions as fn
from pgwarden.policy.catalog_names import (
    CATALOG_OPERATORS,
    GRAMMAR_VERSION,
    catalog_functions,
    catalog_relations,
    newer_syntax,
)
from pgwarden.policy.front import FRONT_CACHE as _FRONT_CACHE
from pgwarden.policy.front import MAX_FRONT_TEXT, front_key, split_runs
from pgwarden.policy.model import ANY

Obj = tuple[str, str]
CATALOG_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
# Never readable or writable through pgwarden, whatever a policy says: password hashes, user
# mapping options (passwords for other servers), column statistics (sample values of masked columns)
# and large-object contents.
FORBIDDEN_RELATIONS: dict[Obj, str] = {
    ("pg_catalog", "pg_authid"): "holds password hashes",
    ("pg_catalog", "pg_shadow"): "holds password hashes",
    ("pg_catalog", "pg_user_mapping"): "holds passwords for other servers",
    ("pg_catalog", "pg_user_mappings"): "holds passwords for other servers",
    ("information_schema", "user_mapping_options"): "holds passwords for other servers",
    ("pg_catalog", "pg_statistic"): "holds sample values of every column",
    ("pg_catalog", "pg_statistic_ext_data"): "holds sample values of every column",
    ("pg_catalog", "pg_largeobject"): "holds large-object contents",
    ("pg_catalog", "pg_subscription"): "holds connection strings with passwords",
}
# Catalog relations that the default `systemCatalogs: read` does not cover (a rule must name them):
# they show values of columns (pg_stats) or other sessions' statements and server configuration.
SENSITIVE_CATALOG_RELATIONS = frozenset({
    ("pg_catalog", "pg_stats"), ("pg_catalog", "pg_stats_ext"), ("pg_catalog", "pg_stats_ext_exprs"),
    ("pg_catalog", "pg_stat_activity"), ("pg_catalog", "pg_hba_file_rules"),
    ("pg_catalog", "pg_ident_file_mappings"), ("pg_catalog", "pg_file_settings"),
    ("pg_catalog", "pg_config"), ("pg_catalog", "pg_prepared_xacts"),
    ("information_schema", "user_mappings"),
})
# Relations of pg_catalog of the newest release pgwarden knows (catalog_names.catalog_relations
# gives a given server's). An unqualified name in the list means the catalog relation: PostgreSQL
# searches pg_catalog before the search_path. Other pg_* names are checked both as pg_catalog.X
# and against the search_path.
CATALOG_RELATIONS = catalog_relations()
MAX_CACHED_TEXT = MAX_FRONT_TEXT


@dataclass(frozen=True)
class Access:
    """One thing a statement does to one object; obj None = not about a relation (e.g. LISTEN)."""

    operation: str
    obj: Obj | None
    # UPDATE/DELETE: whether a WHERE clause that references a column (or CURRENT OF) is present
    has_where: bool = True


@dataclass(frozen=True)
class FunctionUse:
    """A function call; `candidates` are the qualified names it may resolve to."""

    display: str
    bare: str
    candidates: tuple[Obj, ...]
    builtin: bool  # a pg_catalog built-in the engine vouches for
    needs_timeout: bool = False  # pg_sleep*: allowed only under a statementTimeout limit


@dataclass(frozen=True)
class SettingChange:
    """SET/RESET of a safe GUC whose value the engine checks against the policy's limits."""

    name: str
    value_ms: float | None  # None: RESET / DEFAULT / not a readable literal


@dataclass(frozen=True)
class Prepare:
    """PREPARE name AS body (or a named extended-protocol Parse)."""

    name: str
    body: StatementAnalysis

    def describe(self) -> str:
        return f"prepare {self.name}"


@dataclass(frozen=True)
class Deallocate:
    name: str | None  # None: DEALLOCATE ALL

    def describe(self) -> str:
        return f"deallocate {self.name if self.name is not None else 'all'}"


Effect = Prepare | Deallocate


@dataclass(frozen=True)
class CursorChange:
    """DECLARE name (`hold`: WITH HOLD), CLOSE name / CLOSE ALL (name None), or DISCARD ALL
    (`kind` "discard"): what the statement does to the session's portal names when it runs."""

    kind: str  # declare | close | discard
    name: str | None = None
    hold: bool = False


@dataclass(frozen=True)
class ExecuteUse:
    """EXECUTE name: decided as the prepared body; `explain_only` for plain EXPLAIN EXECUTE."""

    name: str
    explain_only: bool = False


@dataclass(frozen=True)
class StatementAnalysis:
    kind: str
    accesses: tuple[Access, ...] = ()
    functions: tuple[FunctionUse, ...] = ()
    violations: tuple[str, ...] = ()
    effects: tuple[Effect, ...] = ()
    executes: tuple[ExecuteUse, ...] = ()
    settings: tuple[SettingChange, ...] = ()
    notes: tuple[str, ...] = ()
    cursors: tuple[CursorChange, ...] = ()
    fetches: tuple[str, ...] = ()  # FETCH / MOVE: the cursor each reads, looked up when it runs


@dataclass(frozen=True)
class Analysis:
    statements: tuple[StatementAnalysis, ...] = ()
    error: str | None = None  # the parser's message when the text does not parse
    # the parse tree with literal values and positions blanked (names kept): texts that differ
    # only in literals share it; masking caches its plans by it too (see blind_tree)
    blind: str = ""

    @cached_property
    def session_dependent(self) -> bool:
        """True when the decision depends on the session's prepared statements (do not cache).
        Asked twice per statement of a shape many statements share: worked out once."""
        return any(s.effects or s.executes for s in self.statements)


# Analyses made elsewhere (the proxy's analysis worker process) for these very text objects
_PROVIDED: list[tuple[str, tuple[str, ...], int, Analysis]] = []


def provide(sql: str, search_path: tuple[str, ...], analysis: Analysis, server_version: int = 0) -> None:
    """Make `analyze(sql, search_path, server_version)` return `analysis` for this string object:
    a long text's tree is then built in the worker process that made it, never in the caller's."""
    _PROVIDED[:] = [(sql, search_path, server_version, analysis), *_PROVIDED[:1]]


def analyze(sql: str, search_path: tuple[str, ...] = ("public",), server_version: int = 0) -> Analysis:
    """Parse and walk `sql`; cached by (text, search_path, server version): policy-independent.

    `server_version` is the server's major version (0: unknown, taken as the newest known): which
    names are pg_catalog's differs between releases."""
    for text, path, version, provided in _PROVIDED:
        if text is sql and path == search_path and version == server_version:
            return provided
    if len(sql) > MAX_CACHED_TEXT:
        return _analyze(sql, search_path, server_version)
    front = front_key(sql)
    if front is None:
        return _analyze_cached(sql, search_path, server_version)
    key = (front, search_path, server_version)
    known = _FRONT_CACHE.get(key, touch=True)
    if isinstance(known, Analysis):
        return known
    analysis = _analyze_cached(sql, search_path, server_version)
    # a new shape: filed when the constant-blind cache holds its analysis (the walk read no literal)
    if known is None and _BLIND_CACHE.get((analysis.blind, search_path, server_version)) is analysis:
        _FRONT_CACHE.put(key, analysis if _probes_agree(sql, analysis.blind) else False)
    return analysis


@lru_cache(maxsize=1024)
def _analyze_cached(sql: str, search_path: tuple[str, ...], server_version: int) -> Analysis:
    return _analyze(sql, search_path, server_version)


def _analyze(sql: str, search_path: tuple[str, ...], server_version: int = 0) -> Analysis:
    if "\x00" in sql:
        return Analysis(error="the statement text contains a NUL byte")
    try:
        text = parse_sql_json(sql)
    except ParseError as e:
        return Analysis(error=_parse_error(sql, e, server_version))
    except RecursionError:
        return Analysis(error="the statement is nested too deeply to analyse")
    key = (blind_tree(text), search_path, server_version)
    hit = _BLIND_CACHE.get(key, touch=True)
    if hit is not None:
        return hit
    reads_before = _CONSTANT_READS.count
    tree = json.loads(text)
    stmts = []
    for raw in tree.get("stmts", ()):
        stmts.append(analyze_statement(raw.get("stmt", {}), search_path, server_version))
    analysis = Analysis(statements=tuple(stmts), blind=key[0])
    if _CONSTANT_READS.count == reads_before and len(key[0]) <= MAX_BLIND_KEY:
        # The walk never looked at a literal's value, so the analysis is a function of the tree
        # with its literal values blanked: statements that differ only in literals share it.
        _BLIND_CACHE.put(key, analysis)
    return analysis


def _parse_error(sql: str, e: ParseError, server_version: int) -> str:
    """Why a text that does not parse is refused; on a server newer than the parser's grammar,
    which construct (when known) and which server version the parser cannot follow."""
    if server_version <= GRAMMAR_VERSION:
        return f"the statement does not parse: {e}"
    construct = newer_syntax(sql) or f"syntax newer than PostgreSQL {GRAMMAR_VERSION}"
    return (
        f"the statement uses {construct}: the server is PostgreSQL {server_version}, pgwarden's parser "
        f"knows PostgreSQL {GRAMMAR_VERSION}'s grammar and cannot check it ({e}); write it without "
        "the newer syntax, or upgrade pgwarden"
    )


# -- constant-blind cache -------------------------------------------------------------------------
# pgbench-style traffic sends a new literal in every statement, so an exact-text cache misses.
# libpg_query's fingerprint would hit, but it also ignores names (aliases, CTE and cursor names),
# and two statements with one fingerprint can touch different tables. This key keeps every name
# and every node; it blanks only literal values and source positions, and an analysis is stored
# under it only when the walk read no literal value (_const_string / _const_value count reads).
MAX_BLIND_KEY = 16384
BLIND_CACHE_SIZE = 2048
_BLIND_CACHE: BoundedCache[tuple[str, tuple[str, ...], int], Analysis] = BoundedCache(BLIND_CACHE_SIZE)
_LITERAL = re.compile(
    r'("A_Const":\{"(sval|fval|bsval|ival|boolval)":)\{(?:"\2":(?:"(?:[^"\\]|\\.)*"|[-+.0-9eE]+|true|false))?\}'
)
# source positions: every node's location, the statement's, and (PostgreSQL 18) where an IN
# list or an ARRAY[...] begins and ends
_POSITION = re.compile(r'"(?:location|stmt_location|stmt_len|rexpr_list_start|rexpr_list_end|list_start|list_end)":-?\d+')


class _Reads(threading.local):
    count = 0


_CONSTANT_READS = _Reads()


def blind_tree(parse_json: str) -> str:
    """The parse tree's JSON with literal values and positions blanked (names are kept).

    Inside a JSON string every quote is escaped, so neither pattern can match within a literal.
    Positions become one constant member (a cache key needs no key names there), which spares
    re's template expansion on every match: this runs for every statement."""
    return _POSITION.sub('"@":0', _LITERAL.sub(_blank_literal, parse_json))


def _blank_literal(m: re.Match[str]) -> str:
    return m.group(1) + "{}"


# -- the lexical front of the constant-blind cache (pgwarden/policy/front.py) ---------------------
# A shape is filed there only when both probes below agree with the text's own tree.

def _probes_agree(sql: str, blind: str) -> bool:
    """The text with its integers replaced by 1, 2, 3, … and by 999999999, 999999998, … parses
    to `blind` both times (small and large, and no two runs equal: a number compared with another
    shows up too)."""
    for first, step in ((1, 1), (999_999_999, -1)):
        values = map(str, itertools.count(first, step))
        parts = split_runs(sql)  # text, number, text, … (the runs front_key blanks, left out)
        text = "".join(part + next(values) for part in parts[:-1]) + parts[-1]
        try:
            probe = parse_sql_json(text)
        except (ParseError, RecursionError):
            return False
        if blind_tree(probe) != blind:
            return False
    return True


def analyze_statement(
    node: dict[str, Any], search_path: tuple[str, ...], server_version: int = 0
) -> StatementAnalysis:
    """Walk one statement node ({"SelectStmt": {...}}) into a StatementAnalysis."""
    walker = _Walker(search_path, server_version=server_version)
    kind = next(iter(node), "Unknown")
    try:
        walker.visit(node, frozenset())
    except RecursionError:
        walker.violations.append("the statement is nested too deeply to analyse")
    except Exception as e:  # a tree shape the walker did not expect: deny, never guess
        walker.violations.append(f"the statement could not be analysed ({type(e).__name__}: {e})")
    return walker.result(kind)


# --- helpers over the JSON tree ---------------------------------------------------------------

def _strings(items: Any) -> list[str]:
    """[{"String": {"sval": "x"}}, …] -> ["x", …] (an empty sval is omitted by the JSON output)."""
    out = []
    for item in items or ():
        if isinstance(item, dict) and "String" in item:
            out.append(item["String"].get("sval", ""))
        else:
            out.append("?")
    return out


def _const_string(node: Any) -> str | None:
    """The value of a string literal, looking through casts ('x'::regclass); None otherwise."""
    _CONSTANT_READS.count += 1  # the decision now depends on a literal: no constant-blind caching
    while isinstance(node, dict) and "TypeCast" in node:
        node = node["TypeCast"].get("arg")
    if isinstance(node, dict) and "A_Const" in node:
        c = node["A_Const"]
        if "sval" in c:
            return str(c["sval"].get("sval", ""))
    return None


def _const_value(node: Any) -> str | int | float | None:
    _CONSTANT_READS.count += 1
    while isinstance(node, dict) and "TypeCast" in node:
        node = node["TypeCast"].get("arg")
    if isinstance(node, dict) and "A_Const" in node:
        c = node["A_Const"]
        if "sval" in c:
            return str(c["sval"].get("sval", ""))
        if "ival" in c:
            return int(c["ival"].get("ival", 0))
        if "fval" in c:
            try:
                return float(c["fval"].get("fval", "0"))
            except ValueError:
                return None
    return None


def _contains(node: Any, kinds: frozenset[str]) -> bool:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in kinds or _contains(v, kinds):
                return True
    elif isinstance(node, list):
        return any(_contains(v, kinds) for v in node)
    return False


_WHERE_MARKERS = frozenset({"ColumnRef", "CurrentOfExpr"})


def split_qualified_name(text: str) -> list[str] | None:
    """Split a regclass-style string ('public."Orders"') as PostgreSQL does; None if malformed."""
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == '"':
            j, buf = i + 1, []
            while True:
                if j >= n:
                    return None
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            part, i = "".join(buf), j + 1
        else:
            j = i
            while j < n and text[j] not in '."' and not text[j].isspace():
                j += 1
            part, i = text[i:j].lower(), j
        if not part:
            return None
        parts.append(part)
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return parts
        if text[i] != ".":
            return None
        i += 1


@lru_cache(maxsize=4096)
def display(obj: Obj | None) -> str:
    """schema.name as SQL would spell it (quoted where needed), for messages and audit."""
    if obj is None:
        return "-"
    if obj == ANY:
        return "(any table)"
    return ".".join(p if _PLAIN.fullmatch(p) else '"' + p.replace('"', '""') + '"' for p in obj)


_PLAIN = re.compile(r"\*|[a-z_][a-z0-9_$]*")


def _is_true(arg: Any) -> bool:
    """The value of a boolean DefElem argument (EXPLAIN (ANALYZE false)); absent means true."""
    if arg is None:
        return True
    if "Boolean" in arg:
        return bool(arg["Boolean"].get("boolval", False))
    if "Integer" in arg:
        return bool(arg["Integer"].get("ival", 0) != 0)
    if "String" in arg:
        return arg["String"].get("sval", "").lower() not in ("false", "off", "0", "no", "of", "f", "n")
    return True  # unknown spelling: assume it runs (fail closed)


# --- statement classification -----------------------------------------------------------------

_OPAQUE = "runs code the policy engine cannot see (functions, procedures, DO blocks)"
_EXTERNAL = "reaches other servers or holds their credentials"
_SERVER = "changes the server or its files; ask a database administrator"
_BINDS = "binds functions to new names (types, operators, casts, aggregates)"

# Statements refused whatever a policy says, with why.
_DENIED_STATEMENTS: dict[str, str] = {
    "DoStmt": "DO " + _OPAQUE, "CallStmt": "CALL " + _OPAQUE,
    "CreateFunctionStmt": "CREATE FUNCTION/PROCEDURE " + _OPAQUE,
    "AlterFunctionStmt": "ALTER FUNCTION/PROCEDURE " + _OPAQUE,
    "ReturnStmt": "RETURN " + _OPAQUE, "PLAssignStmt": "PL/pgSQL assignment " + _OPAQUE,
    "CreatePLangStmt": "CREATE LANGUAGE " + _OPAQUE, "CreateTransformStmt": "CREATE TRANSFORM " + _BINDS,
    "CreateCastStmt": "CREATE CAST " + _BINDS, "CreateConversionStmt": "CREATE CONVERSION " + _BINDS,
    "CreateOpClassStmt": "CREATE OPERATOR CLASS " + _BINDS, "CreateOpFamilyStmt": "CREATE OPERATOR FAMILY " + _BINDS,
    "AlterOpFamilyStmt": "ALTER OPERATOR FAMILY " + _BINDS, "AlterOperatorStmt": "ALTER OPERATOR " + _BINDS,
    "AlterTypeStmt": "ALTER TYPE … SET " + _BINDS, "CreateRangeStmt": "CREATE TYPE … AS RANGE " + _BINDS,
    "CreateAmStmt": "CREATE ACCESS METHOD " + _BINDS,
    "CreateEventTrigStmt": "event triggers " + _OPAQUE, "AlterEventTrigStmt": "event triggers " + _OPAQUE,
    "CreateFdwStmt": "foreign data wrappers " + _EXTERNAL, "AlterFdwStmt": "foreign data wrappers " + _EXTERNAL,
    "CreateForeignServerStmt": "foreign servers " + _EXTERNAL,
    "AlterForeignServerStmt": "foreign servers " + _EXTERNAL,
    "CreateUserMappingStmt": "user mappings " + _EXTERNAL, "AlterUserMappingStmt": "user mappings " + _EXTERNAL,
    "DropUserMappingStmt": "user mappings " + _EXTERNAL, "ImportForeignSchemaStmt": "IMPORT FOREIGN SCHEMA " + _EXTERNAL,
    "CreateForeignTableStmt": "foreign tables " + _EXTERNAL,
    "CreatePublicationStmt": "publications " + _EXTERNAL, "AlterPublicationStmt": "publications " + _EXTERNAL,
    "CreateSubscriptionStmt": "subscriptions " + _EXTERNAL, "AlterSubscriptionStmt": "subscriptions " + _EXTERNAL,
    "DropSubscriptionStmt": "subscriptions " + _EXTERNAL,
    "CreateTableSpaceStmt": "tablespaces " + _SERVER, "DropTableSpaceStmt": "tablespaces " + _SERVER,
    "AlterTableSpaceOptionsStmt": "tablespaces " + _SERVER, "AlterTableMoveAllStmt": "tablespaces " + _SERVER,
    "CreatedbStmt": "CREATE DATABASE " + _SERVER, "DropdbStmt": "DROP DATABASE " + _SERVER,
    "AlterDatabaseStmt": "ALTER DATABASE " + _SERVER, "AlterDatabaseSetStmt": "ALTER DATABASE " + _SERVER,
    "AlterDatabaseRefreshCollStmt": "ALTER DATABASE " + _SERVER,
    "AlterSystemStmt": "ALTER SYSTEM " + _SERVER, "LoadStmt": "LOAD " + _OPAQUE,
    "SecLabelStmt": "SECURITY LABEL " + _SERVER, "AlterObjectDependsStmt": "ALTER … DEPENDS ON EXTENSION " + _SERVER,
}
# Statements that only need their operation allowed; relations they name are objects of it.
_OPERATION_STATEMENTS: dict[str, str] = {
    "CreateStmt": "ddl", "IndexStmt": "ddl", "ViewStmt": "ddl", "AlterTableStmt": "ddl",
    "RenameStmt": "ddl", "AlterObjectSchemaStmt": "ddl", "CommentStmt": "ddl", "CreateSeqStmt": "ddl",
    "AlterSeqStmt": "ddl", "CreateDomainStmt": "ddl", "AlterDomainStmt": "ddl", "CompositeTypeStmt": "ddl",
    "CreateEnumStmt": "ddl", "AlterEnumStmt": "ddl", "CreateStatsStmt": "ddl", "AlterStatsStmt": "ddl",
    "CreateTrigStmt": "ddl", "RuleStmt": "ddl", "AlterTSDictionaryStmt": "ddl",
    "AlterTSConfigurationStmt": "ddl", "AlterCollationStmt": "ddl", "DefineStmt": "ddl",
    "ReplicaIdentityStmt": "ddl",
    "CreatePolicyStmt": "grant", "AlterPolicyStmt": "grant", "GrantStmt": "grant",
    "AlterDefaultPrivilegesStmt": "grant", "AlterOwnerStmt": "grant",
    "CreateRoleStmt": "role", "AlterRoleStmt": "role", "AlterRoleSetStmt": "role", "DropRoleStmt": "role",
    "GrantRoleStmt": "role", "ReassignOwnedStmt": "role", "DropOwnedStmt": "role",
    "CreateExtensionStmt": "extension", "AlterExtensionStmt": "extension",
    "AlterExtensionContentsStmt": "extension",
    "VacuumStmt": "maintenance", "ReindexStmt": "maintenance", "ClusterStmt": "maintenance",
    "RefreshMatViewStmt": "maintenance", "CheckPointStmt": "maintenance",
}
_CURSOR_OPT_HOLD = 0x0020  # parsenodes.h: DECLARE … WITH HOLD
# Statements that are always fine: no data, no identity change.
_HARMLESS_STATEMENTS = frozenset({
    "VariableShowStmt", "FetchStmt", "ClosePortalStmt", "ConstraintsSetStmt", "UnlistenStmt",
})
_RELATION_DROP_TYPES = frozenset({
    "OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_INDEX", "OBJECT_SEQUENCE", "OBJECT_FOREIGN_TABLE",
})
_DEFINE_DENIED = frozenset({"OBJECT_AGGREGATE", "OBJECT_OPERATOR", "OBJECT_TYPE", "OBJECT_TSPARSER",
                            "OBJECT_TSTEMPLATE"})
_ALTER_TABLE_GRANT_CMDS = frozenset({"AT_ChangeOwner", "AT_EnableRowSecurity", "AT_DisableRowSecurity",
                                     "AT_ForceRowSecurity", "AT_NoForceRowSecurity"})


@dataclass
class _Walker:
    """Collects what one statement does. `rv_op` is what a plain relation reference means here."""

    search_path: tuple[str, ...]
    rv_op: str = "select"
    server_version: int = 0  # the server's major version; 0 = the newest known
    accesses: list[Access] = field(default_factory=list)
    functions: list[FunctionUse] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)
    executes: list[ExecuteUse] = field(default_factory=list)
    settings: list[SettingChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cursors: list[CursorChange] = field(default_factory=list)
    fetches: list[str] = field(default_factory=list)

    def result(self, kind: str) -> StatementAnalysis:
        return StatementAnalysis(
            kind=kind,
            accesses=tuple(dict.fromkeys(self.accesses)),
            functions=tuple(dict.fromkeys(self.functions)),
            violations=tuple(dict.fromkeys(self.violations)),
            effects=tuple(self.effects),
            executes=tuple(self.executes),
            settings=tuple(self.settings),
            notes=tuple(dict.fromkeys(self.notes)),
            cursors=tuple(self.cursors),
            fetches=tuple(self.fetches),
        )

    # -- generic walk --------------------------------------------------------------------------

    def visit(self, node: Any, ctes: frozenset[str]) -> None:
        if isinstance(node, list):
            for item in node:
                self.visit(item, ctes)
            return
        if not isinstance(node, dict):
            return
        if len(node) == 1:
            (key, body), = node.items()
            if key[:1].isupper():
                handler = _HANDLERS.get(key)
                if handler is not None:
                    handler(self, body, ctes)
                    return
                if key.endswith("Stmt"):
                    self._statement(key, body, ctes)
                    return
                self.visit(body, ctes)
                return
        if "relname" in node:  # an inline RangeVar (a field typed RangeVar* is not wrapped)
            self.range_var(node, ctes)
            return
        for value in node.values():
            if isinstance(value, dict | list):
                self.visit(value, ctes)

    def visit_as(self, op: str, node: Any, ctes: frozenset[str]) -> None:
        saved, self.rv_op = self.rv_op, op
        try:
            self.visit(node, ctes)
        finally:
            self.rv_op = saved

    def _statement(self, key: str, body: dict[str, Any], ctes: frozenset[str]) -> None:
        if key in _DENIED_STATEMENTS:
            self.violations.append(_DENIED_STATEMENTS[key])
            self.visit(body, ctes)  # still report what it names
            return
        if key in _HARMLESS_STATEMENTS:
            return
        op = _OPERATION_STATEMENTS.get(key)
        if op is None:
            self.violations.append(f"{key} is a statement the policy engine does not understand")
            return
        self.operation_statement(key, op, body, ctes)

    # -- names ---------------------------------------------------------------------------------

    def resolve(self, schema: str | None, name: str, persistence: str = "p") -> list[Obj]:
        """Candidates an unqualified relation name may mean under the pinned search_path."""
        if schema:
            return [(schema, name)]
        if persistence == "t":
            return [("pg_temp", name)]
        if "pg_catalog" not in self.search_path:  # PostgreSQL then searches pg_catalog first
            if name in catalog_relations(self.server_version):
                return [("pg_catalog", name)]
            if name.startswith("pg_"):
                return [("pg_catalog", name), *((s, name) for s in self.search_path)]
        return [(s, name) for s in self.search_path]

    def relation(self, rv: dict[str, Any]) -> list[Obj]:
        return self.resolve(rv.get("schemaname"), rv.get("relname", ""), rv.get("relpersistence", "p"))

    def add(self, op: str, objs: list[Obj] | Obj | None, has_where: bool = True) -> None:
        if objs is None or isinstance(objs, tuple):
            objs = [objs]  # type: ignore[list-item]
        for obj in objs:
            if obj is not None and obj in FORBIDDEN_RELATIONS:
                self.violations.append(f"{display(obj)} {FORBIDDEN_RELATIONS[obj]} and is never accessible")
            self.accesses.append(Access(op, obj, has_where))

    def range_var(self, rv: dict[str, Any], ctes: frozenset[str]) -> None:
        if self.rv_op == "select" and not rv.get("schemaname") and rv.get("relname") in ctes:
            return  # a reference to a WITH query, not a table
        self.add(self.rv_op, self.relation(rv))

    def n_RangeVar(self, body: dict[str, Any], ctes: frozenset[str]) -> None:
        self.range_var(body, ctes)

    # -- queries -------------------------------------------------------------------------------

    def with_clause(self, wc: dict[str, Any] | None, ctes: frozenset[str]) -> frozenset[str]:
        """Visit CTE bodies with PostgreSQL's scoping; return the names visible to the main query."""
        if not wc:
            return ctes
        items = [c.get("CommonTableExpr", {}) for c in wc.get("ctes", ())]
        names = [c.get("ctename", "") for c in items]
        if wc.get("recursive"):
            scope = ctes | frozenset(names)
            for c in items:
                self.visit_as("select", c.get("ctequery"), scope)
        else:
            scope = ctes
            for c, name in zip(items, names, strict=True):
                self.visit_as("select", c.get("ctequery"), scope)
                scope = scope | {name}
        for c in items:  # SEARCH / CYCLE clauses hold only column names
            self.visit_as("select", {k: v for k, v in c.items() if k not in ("ctequery",)}, ctes)
        return ctes | frozenset(names)

    def n_SelectStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        saved, self.rv_op = self.rv_op, "select"
        try:
            ctes = self.with_clause(n.get("withClause"), ctes)
            mark = len(self.accesses)
            self.visit(n.get("fromClause"), ctes)
            if n.get("lockingClause"):
                locked = {a.obj for a in self.accesses[mark:] if a.operation == "select"}
                for obj in sorted(locked, key=lambda o: o or ("", "")):
                    self.add("lock", obj)
                self.notes.append("FOR UPDATE / SHARE locks rows: needs the lock operation")
            for key in ("larg", "rarg"):
                if n.get(key):
                    self.n_SelectStmt(n[key], ctes)
            into = n.get("intoClause")
            if into:
                self.add("ddl", self.relation(into.get("rel", {})))
                self.notes.append("SELECT INTO creates a table: needs the ddl operation")
            for key, value in n.items():
                if key not in ("withClause", "fromClause", "lockingClause", "larg", "rarg", "intoClause"):
                    self.visit(value, ctes)
        finally:
            self.rv_op = saved

    def _returning(self, n: dict[str, Any], target: list[Obj], ctes: frozenset[str]) -> None:
        rc = n.get("returningClause") or n.get("returningList")
        if rc:
            self.add("select", target)
            self.visit_as("select", rc, ctes)

    def n_InsertStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        ctes = self.with_clause(n.get("withClause"), ctes)
        target = self.relation(n.get("relation", {}))
        self.add("insert", target)
        occ = n.get("onConflictClause")
        if occ and occ.get("action") == "ONCONFLICT_UPDATE":
            self.add("update", target)
        self.visit_as("select", n.get("cols"), ctes)  # subscripts: col[(SELECT …)]
        self.visit_as("select", n.get("selectStmt"), ctes)
        self.visit_as("select", occ, ctes)
        self._returning(n, target, ctes)

    def n_UpdateStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        ctes = self.with_clause(n.get("withClause"), ctes)
        target = self.relation(n.get("relation", {}))
        self.add("update", target, has_where=_contains(n.get("whereClause"), _WHERE_MARKERS))
        for key in ("targetList", "fromClause", "whereClause"):
            self.visit_as("select", n.get(key), ctes)
        self._returning(n, target, ctes)

    def n_DeleteStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        ctes = self.with_clause(n.get("withClause"), ctes)
        target = self.relation(n.get("relation", {}))
        self.add("delete", target, has_where=_contains(n.get("whereClause"), _WHERE_MARKERS))
        for key in ("usingClause", "whereClause"):
            self.visit_as("select", n.get(key), ctes)
        self._returning(n, target, ctes)

    def n_MergeStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        ctes = self.with_clause(n.get("withClause"), ctes)
        target = self.relation(n.get("relation", {}))
        self.add("merge", target)
        ops = {"CMD_INSERT": "insert", "CMD_UPDATE": "update", "CMD_DELETE": "delete"}
        for w in n.get("mergeWhenClauses", ()):
            op = ops.get(w.get("MergeWhenClause", {}).get("commandType", ""))
            if op:
                self.add(op, target)
        for key in ("sourceRelation", "joinCondition", "mergeWhenClauses"):
            self.visit_as("select", n.get(key), ctes)
        self._returning(n, target, ctes)

    def n_FuncCall(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        self.function(_strings(n.get("funcname")), n.get("args") or [])
        for key, value in n.items():
            if key != "funcname":
                self.visit(value, ctes)

    def operator(self, name: list[str], kind: str = "") -> None:
        if len(name) > 1 and name[-2] != "pg_catalog":
            self.violations.append(f"operator {'.'.join(name)} is user-defined code the engine cannot see")
        elif name and name[-1] not in CATALOG_OPERATORS and not kind.startswith("AEXPR_BETWEEN"):
            self.violations.append(f"operator {name[-1]} is not a PostgreSQL operator; user-defined operators "
                                   "run code the engine cannot see")

    def n_A_Expr(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        self.operator(_strings(n.get("name")), n.get("kind", ""))
        for key in ("lexpr", "rexpr"):
            self.visit(n.get(key), ctes)

    def n_SubLink(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        """`x OP ANY (SELECT …)`: the comparison operator is code like any A_Expr's."""
        self.operator(_strings(n.get("operName")))
        self.visit({k: v for k, v in n.items() if k != "operName"}, ctes)

    def n_SortBy(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        """`ORDER BY x USING op`: the sort operator is code like any A_Expr's."""
        self.operator(_strings(n.get("useOp")))
        self.visit({k: v for k, v in n.items() if k != "useOp"}, ctes)

    # -- functions -----------------------------------------------------------------------------

    def function(self, names: list[str], args: list[Any]) -> None:
        name = names[-1] if names else ""
        schema = names[-2] if len(names) >= 2 else None
        why = fn.always_denied(name)
        if why:
            self.violations.append(f"function {'.'.join(names)} {why}")
        catalog = schema in (None, "pg_catalog")
        if catalog and name in fn.SPECIAL_FUNCTIONS:
            self.special_function(name, args)
            if name.startswith("pg_sleep"):
                self.functions.append(FunctionUse(f"pg_catalog.{name}", name, (("pg_catalog", name),), True,
                                                  needs_timeout=True))
            return
        if schema == "information_schema" and name in fn.INFORMATION_SCHEMA_FUNCTIONS:
            self.functions.append(FunctionUse(f"{schema}.{name}", name, ((schema, name),), True))
        elif catalog and fn.is_builtin(name, self.server_version):
            self.functions.append(FunctionUse(f"pg_catalog.{name}", name, (("pg_catalog", name),), True))
        elif schema is not None:
            self.functions.append(FunctionUse(f"{schema}.{name}", name, ((schema, name),), False))
        else:
            # pg_catalog is searched first, so a catalog name (of this server's release) means the
            # catalog function; an unknown pg_* name (a newer server's?) must be allowed both there
            # and on the search_path
            cands = tuple((s, name) for s in self.search_path)
            if name in catalog_functions(self.server_version):
                cands = (("pg_catalog", name),)
            elif name.startswith("pg_"):
                cands = (("pg_catalog", name), *cands)
            self.functions.append(FunctionUse(name, name, cands, False))

    def special_function(self, name: str, args: list[Any]) -> None:
        if name in fn.SEQUENCE_FUNCTIONS:
            if name == "lastval":
                return
            literal = _const_string(args[0]) if args else None
            parts = split_qualified_name(literal) if literal is not None else None
            if not parts or len(parts) > 3:
                self.violations.append(f"{name}() needs a literal sequence name so the engine can check it")
                return
            seq = self.resolve(parts[-2] if len(parts) >= 2 else None, parts[-1])
            self.add("select" if name == "currval" else "update", seq)
            return
        if name == "pg_notify":
            self.add("notify", None)
            return
        if name == "set_config":
            guc = _const_string(args[0]) if args else None
            value = _const_value(args[1]) if len(args) > 1 else None
            if guc is None:
                self.violations.append("set_config() needs a literal setting name so the engine can check it")
                return
            self.setting(guc, "VAR_SET_VALUE", [value] if value is not None else None, via="set_config")

    # -- session settings ----------------------------------------------------------------------

    def n_VariableSetStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        kind = n.get("kind", "")
        if kind == "VAR_RESET_ALL":
            self.violations.append("RESET ALL would undo the session settings pgwarden pins")
            return
        name = n.get("name", "")
        if kind == "VAR_SET_MULTI":
            if name in ("TRANSACTION", "SESSION CHARACTERISTICS", "TRANSACTION SNAPSHOT"):
                return
            self.violations.append(f"SET {name} is not understood")
            return
        values: list[Any] | None = None
        if kind == "VAR_SET_VALUE":
            values = [_const_value(a) for a in n.get("args", ())]
        self.setting(name, kind, values, via="SET" if kind != "VAR_RESET" else "RESET")

    def setting(self, name: str, kind: str, values: list[Any] | None, via: str) -> None:
        guc = name.lower()
        if guc in ("role", "session_authorization"):
            self.violations.append(f"{via} {guc} would change who the session is; pgwarden decides that at login")
            return
        if guc == "search_path":
            self.violations.append(f"{via} search_path would change what table names mean; "
                                   "write schema-qualified names instead")
            return
        if guc not in fn.SAFE_SETTINGS and guc != "client_encoding":
            self.violations.append(f"{via} {name} is not a setting agents may change "
                                   "(allowed: application_name, TimeZone, DateStyle, statement_timeout, …)")
            return
        if guc == "client_encoding":
            if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
                return
            if not values or len(values) != 1 or not isinstance(values[0], str) \
                    or values[0].lower() not in fn.UTF8_NAMES:
                self.violations.append(f"{via} client_encoding: pgwarden only relays UTF8")
            return
        if guc in fn.TIMEOUT_SETTINGS:
            ms = None
            if values and len(values) == 1 and values[0] is not None:
                ms = fn.pg_duration_ms(values[0])
                if ms is None:
                    self.violations.append(f"{via} {name}: the value is not a duration the engine can read")
                    return
            self.settings.append(SettingChange(guc, ms))

    # -- prepared statements, cursors, EXPLAIN, COPY, transactions ------------------------------

    def n_PrepareStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        body = analyze_statement(n.get("query", {}), self.search_path, self.server_version)
        self.effects.append(Prepare(n.get("name", ""), body))
        self.visit(n.get("argtypes"), ctes)

    def n_ExecuteStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        self.executes.append(ExecuteUse(n.get("name", "")))
        self.visit_as("select", n.get("params"), ctes)

    def n_DeallocateStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        self.effects.append(Deallocate(None if n.get("isall") or not n.get("name") else n["name"]))

    def n_DiscardStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        if n.get("target") == "DISCARD_ALL":
            self.cursors.append(CursorChange("discard"))
            self.violations.append("DISCARD ALL would undo the session settings pgwarden pins; "
                                   "use DISCARD PLANS / TEMP / SEQUENCES or DEALLOCATE ALL")

    def n_DeclareCursorStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        self.cursors.append(CursorChange("declare", n.get("portalname", ""), bool(n.get("options", 0) & _CURSOR_OPT_HOLD)))
        self.visit_as("select", n.get("query"), ctes)

    def n_ClosePortalStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        self.cursors.append(CursorChange("close", n.get("portalname") or None))

    def n_FetchStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        if n.get("portalname"):
            self.fetches.append(n["portalname"])

    def n_ExplainStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        analyze_opt = False
        for opt in n.get("options") or ():
            d = opt.get("DefElem", {})
            if d.get("defname", "").lower() == "analyze":
                analyze_opt = _is_true(d.get("arg"))
        mark_a, mark_e = len(self.accesses), len(self.executes)
        self.visit_as("select", n.get("query"), ctes)
        if analyze_opt:
            self.notes.append("EXPLAIN ANALYZE runs the statement: decided as the statement itself")
            return
        self.accesses[mark_a:] = [Access("select", a.obj) for a in self.accesses[mark_a:]]
        self.executes[mark_e:] = [ExecuteUse(e.name, explain_only=True) for e in self.executes[mark_e:]]
        self.notes.append("plain EXPLAIN plans without running: decided as a read")

    def n_CopyStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        if n.get("filename") is not None or n.get("is_program"):
            where = "a program" if n.get("is_program") else "a server file"
            self.violations.append(f"COPY {'from' if n.get('is_from') else 'to'} {where} touches the database "
                                   "server; use COPY … TO STDOUT / FROM STDIN")
        if n.get("query"):
            self.visit_as("select", n["query"], ctes)
        elif n.get("relation"):
            self.add("insert" if n.get("is_from") else "select", self.relation(n["relation"]))
        self.visit_as("select", n.get("whereClause"), ctes)

    def n_TransactionStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        kind = n.get("kind", "")
        if kind in ("TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED"):
            self.violations.append("two-phase commit outlives the session and can finish other sessions' "
                                   "transactions; it is not available through pgwarden")

    def n_ListenStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        self.add("listen", None)

    def n_NotifyStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        self.add("notify", None)

    def n_TruncateStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        self.visit_as("truncate", n.get("relations"), ctes)
        if n.get("behavior") == "DROP_CASCADE":
            self.add("truncate", ANY)
            self.notes.append("CASCADE reaches tables the statement does not name")

    def n_LockStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        self.visit_as("lock", n.get("relations"), ctes)

    def n_CreateTableAsStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        into = n.get("into") or {}
        self.add("ddl", self.relation(into.get("rel", {})))
        self.notes.append("CREATE TABLE AS creates a table: needs the ddl operation")
        self.visit_as("select", n.get("query"), ctes)

    # -- DDL and other operation statements ----------------------------------------------------

    def operation_statement(self, key: str, op: str, n: dict[str, Any], ctes: frozenset[str]) -> None:
        if key == "DefineStmt" and n.get("kind") in _DEFINE_DENIED:
            self.violations.append(f"CREATE {n['kind'][7:]} " + _BINDS)
            return
        if key == "CreateTrigStmt":
            self.function(_strings(n.get("funcname")), [])
        if key == "AlterTableStmt":
            for cmd in n.get("cmds", ()):
                if cmd.get("AlterTableCmd", {}).get("subtype") in _ALTER_TABLE_GRANT_CMDS:
                    self.add("grant", self.relation(n.get("relation", {})))
        if key == "GrantStmt" and n.get("targtype") == "ACL_TARGET_ALL_IN_SCHEMA":
            for schema in _strings(n.get("objects")):
                self.add(op, (schema, "*"))
            return
        if key == "GrantStmt" and n.get("objtype") != "OBJECT_TABLE":
            self.add(op, None)
            return
        before = len(self.accesses)
        if key == "DefineStmt" or key in ("CreateDomainStmt", "AlterDomainStmt", "CreateEnumStmt",
                                           "AlterEnumStmt", "AlterTSDictionaryStmt", "AlterTSConfigurationStmt",
                                           "AlterCollationStmt"):
            self.visit_as(op, {k: v for k, v in n.items() if k != "typeName"}, ctes)
        else:
            self.visit_as(op, n, ctes)
        if key in ("VacuumStmt", "ClusterStmt", "ReindexStmt") and len(self.accesses) == before:
            self.add(op, ANY)  # the whole database or schema
        elif len(self.accesses) == before:
            self.add(op, None)

    def n_CreateSchemaStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        name = n.get("schemaname") or "?"
        self.add("ddl", (name, "*"))
        saved = self.search_path
        self.search_path = (name,)
        try:
            self.visit_as("ddl", n.get("schemaElts"), ctes)
        finally:
            self.search_path = saved

    def n_DropStmt(self, n: dict[str, Any], ctes: frozenset[str]) -> None:
        remove = n.get("removeType", "")
        op = "extension" if remove == "OBJECT_EXTENSION" else "ddl"
        before = len(self.accesses)
        for obj in n.get("objects", ()):
            names = _strings(obj.get("List", {}).get("items")) if "List" in obj else None
            if remove in _RELATION_DROP_TYPES and names:
                self.add(op, self.resolve(names[-2] if len(names) >= 2 else None, names[-1]))
            elif remove in ("OBJECT_TRIGGER", "OBJECT_RULE", "OBJECT_POLICY") and names and len(names) >= 2:
                table = names[:-1]
                self.add(op, self.resolve(table[-2] if len(table) >= 2 else None, table[-1]))
            elif remove == "OBJECT_SCHEMA" and "String" in obj:
                self.add(op, (obj["String"].get("sval", ""), "*"))
        if len(self.accesses) == before:
            self.add(op, None)
        if n.get("behavior") == "DROP_CASCADE":
            self.add(op, ANY)
            self.notes.append("CASCADE reaches objects the statement does not name")


def _handler_table() -> dict[str, Callable[[_Walker, Any, frozenset[str]], None]]:
    return {name[2:]: getattr(_Walker, name) for name in dir(_Walker) if name.startswith("n_")}


_HANDLERS = _handler_table()
