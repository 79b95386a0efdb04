"""Which held writes may be previewed, and the text that measures them (approval.preview: rows).

A preview runs the held statement once, on a separate connection, inside a transaction that is
always rolled back. A rollback undoes what the statement does to tables, but not what code it
calls may do outside the transaction (a function that opens a connection, writes a file, sends
a message). So only statements the engine fully understands are previewed, and only when every
function they call is a built-in the engine vouches for as free of side effects
(`functions.BUILTIN_FUNCTIONS`). `nextval()` is the one exception: a sequence advances even when
the transaction rolls back, so a preview leaves a gap in its numbers (docs/approvals.md) and
nothing else; `setval()` sets a sequence for good and gets no preview.

Everything here is pure: `plan_preview(sql)` returns the text to run, or why there is none.

The text wraps the statement in a data-modifying CTE that returns every changed row, so the
server counts them and sends only a sample:

    WITH pgwarden_preview AS (DELETE … RETURNING *)
    SELECT (SELECT count(*) FROM pgwarden_preview) AS pgwarden_affected, * FROM pgwarden_preview LIMIT 5

An UPDATE's rows before the change come from the same statement: the target is joined to a
snapshot of itself by (tableoid, ctid), which matches each target row exactly once, and RETURNING
gives that snapshot's columns next to the new ones. A MERGE on a server before PostgreSQL 17
(no RETURNING for MERGE) is run as written: its count, no sample.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pglast import ast, parse_sql
from pglast.enums import BoolExprType
from pglast.parser import ParseError, parse_sql_json
from pglast.stream import RawStream

from pgwarden.policy import functions as fn

PreviewKind = Literal["insert", "update", "delete", "merge"]

CTE_NAME = "pgwarden_preview"
COUNT_COLUMN = "pgwarden_affected"
OLD_ALIAS = "pgwarden_old"
OLD_MARKERS = ("pgwarden_tableoid", "pgwarden_ctid")  # the UPDATE snapshot's join keys (not returned)
OLD_ROW = "pgwarden_row"
SNAP = "pgwarden_snapshot"
SAMPLE_ROWS = 5

_KINDS: dict[str, PreviewKind] = {
    "InsertStmt": "insert",
    "UpdateStmt": "update",
    "DeleteStmt": "delete",
    "MergeStmt": "merge",
}
_DML = frozenset(_KINDS)


@dataclass(frozen=True)
class PreviewPlan:
    """What to run for a preview. `count_only`: `sql` is the statement itself; its CommandComplete
    tag carries the count. Otherwise the first result column is the count and the rest a sample
    (`kind` update: the snapshot's columns, then the new ones)."""

    kind: PreviewKind
    sql: str
    count_only: bool = False
    notes: tuple[str, ...] = ()  # what the preview does that a rollback does not undo (sequences)
    # UPDATE: the target's rows as stored (`SELECT * FROM target`): masking plans the sample's
    # "before" columns by this text, whose lineage is the table's own columns in the same order
    before_sql: str = ""
    # the written table, as an identifier text for ::regclass, and every relation the text names:
    # what else the write would run is looked up in the preview's transaction before it runs
    target: str = ""
    reads: tuple[str, ...] = ()
    # the names the text calls: functions, operators, and whether it casts (EFFECTS_SQL column 7)
    functions: tuple[str, ...] = ()
    operators: tuple[str, ...] = ()
    typecasts: bool = False
    # the types it casts to (quoted identifier texts): a domain's CHECK runs at the cast, also
    # inside a composite or array type (the `typed` closure of EFFECTS_SQL)
    types: tuple[str, ...] = ()


# What a write may run besides itself, looked up in the preview's own transaction before it runs;
# anything found means no preview (code of the database's own could reach outside the transaction:
# dblink, an untrusted language). `reached`: the written table, its partitions and inheritance
# children, and the tables its foreign keys cascade to; `read`: every other relation the text
# names. Columns: (1) reached relations that are not plain tables, (2) their user triggers,
# (3) their rules, (4) functions outside pg_catalog their defaults, generated columns, check
# constraints, column domains' constraints and index expressions call, and non-built-in operator
# classes of their indexes, (5) row-level security on any relation, (6) views and foreign tables
# read, (7) functions, operators and casts outside pg_catalog the text's own names could resolve to
# (an overload of upper(), a user `=`, an implicit cast).
EFFECTS_SQL = """WITH RECURSIVE reached(oid) AS (
    SELECT {target}::regclass::oid
  UNION
    SELECT x.oid FROM reached r CROSS JOIN LATERAL (
        SELECT i.inhrelid AS oid FROM pg_catalog.pg_inherits i WHERE i.inhparent = r.oid
      UNION ALL
        SELECT c.conrelid FROM pg_catalog.pg_constraint c
        WHERE c.confrelid = r.oid AND c.contype = 'f'
          AND (c.confdeltype IN ('c', 'n', 'd') OR c.confupdtype IN ('c', 'n', 'd'))) x
),
typed(oid) AS (
    SELECT a.atttypid FROM reached r JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid
    WHERE a.attnum > 0 AND NOT a.attisdropped
  UNION
    SELECT pg_catalog.to_regtype(n)::oid FROM pg_catalog.unnest({types}::text[]) AS n
    WHERE pg_catalog.to_regtype(n) IS NOT NULL
  UNION
    SELECT x.oid FROM typed d JOIN pg_catalog.pg_type t ON t.oid = d.oid CROSS JOIN LATERAL (
        SELECT t.typbasetype AS oid WHERE t.typtype = 'd'
      UNION ALL
        SELECT t.typelem WHERE t.typelem <> 0
      UNION ALL
        SELECT a.atttypid FROM pg_catalog.pg_attribute a
        WHERE t.typtype = 'c' AND a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped) x
),
read(oid) AS (
    SELECT pg_catalog.to_regclass(n)::oid FROM pg_catalog.unnest({read}::text[]) AS n
    WHERE pg_catalog.to_regclass(n) IS NOT NULL
),
code(classid, objid) AS (
    SELECT 'pg_catalog.pg_attrdef'::regclass, a.oid FROM reached r JOIN pg_catalog.pg_attrdef a ON a.adrelid = r.oid
  UNION ALL
    SELECT 'pg_catalog.pg_constraint'::regclass, c.oid FROM reached r
    JOIN pg_catalog.pg_constraint c ON c.conrelid = r.oid
  UNION ALL
    SELECT 'pg_catalog.pg_constraint'::regclass, c.oid FROM typed t
    JOIN pg_catalog.pg_constraint c ON c.contypid = t.oid
  UNION ALL
    SELECT 'pg_catalog.pg_class'::regclass, i.indexrelid FROM reached r
    JOIN pg_catalog.pg_index i ON i.indrelid = r.oid
)
SELECT (SELECT string_agg(DISTINCT format('%s (%s)', c.oid::regclass, c.relkind), ', ')
          FROM reached r JOIN pg_catalog.pg_class c ON c.oid = r.oid WHERE c.relkind NOT IN ('r', 'p')),
       (SELECT string_agg(DISTINCT format('%s on %s', t.tgname, t.tgrelid::regclass), ', ')
          FROM reached r JOIN pg_catalog.pg_trigger t ON t.tgrelid = r.oid
          WHERE NOT t.tgisinternal AND t.tgenabled <> 'D'),
       (SELECT string_agg(DISTINCT format('%s on %s', w.rulename, w.ev_class::regclass), ', ')
          FROM reached r JOIN pg_catalog.pg_rewrite w ON w.ev_class = r.oid WHERE w.rulename <> '_RETURN'),
       (SELECT string_agg(DISTINCT f, ', ') FROM (
            SELECT p.oid::regprocedure::text AS f FROM code k
            JOIN pg_catalog.pg_depend d ON d.classid = k.classid AND d.objid = k.objid
             AND d.refclassid = 'pg_catalog.pg_proc'::regclass
            JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid
            WHERE p.pronamespace <> 'pg_catalog'::regnamespace
          UNION ALL
            SELECT format('operator class %s', oc.opcname) FROM reached r
            JOIN pg_catalog.pg_index i ON i.indrelid = r.oid
            JOIN pg_catalog.pg_opclass oc ON oc.oid = ANY (i.indclass::oid[])
            WHERE oc.opcnamespace <> 'pg_catalog'::regnamespace) fs),
       (SELECT string_agg(DISTINCT c.oid::regclass::text, ', ')
          FROM (SELECT oid FROM reached UNION SELECT oid FROM read) x
          JOIN pg_catalog.pg_class c ON c.oid = x.oid WHERE c.relrowsecurity),
       (SELECT string_agg(DISTINCT format('%s (%s)', c.oid::regclass, c.relkind), ', ')
          FROM read x JOIN pg_catalog.pg_class c ON c.oid = x.oid WHERE c.relkind IN ('v', 'f')),
       (SELECT string_agg(DISTINCT y, ', ') FROM (
            SELECT p.oid::regprocedure::text AS y FROM pg_catalog.pg_proc p
            WHERE p.pronamespace <> 'pg_catalog'::regnamespace AND p.proname = ANY ({functions}::text[])
          UNION ALL
            SELECT format('operator %s', o.oid::regoperator) FROM pg_catalog.pg_operator o
            WHERE o.oprnamespace <> 'pg_catalog'::regnamespace AND o.oprname = ANY ({operators}::text[])
          UNION ALL
            SELECT format('cast %s', c.castfunc::regprocedure) FROM pg_catalog.pg_cast c
            JOIN pg_catalog.pg_proc p ON p.oid = c.castfunc
            WHERE p.pronamespace <> 'pg_catalog'::regnamespace AND (c.castcontext <> 'e' OR {typecasts})) ys)"""

# comparisons a statement makes without naming an operator (BETWEEN, IN, ORDER BY, DISTINCT,
# GROUP BY, joins USING): a user operator of these names is looked up as well
IMPLICIT_OPERATORS = ("=", "<>", "<", ">", "<=", ">=")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _array(items: Iterable[str]) -> str:
    return "ARRAY[" + ", ".join(_literal(x) for x in sorted(set(items))) + "]::text[]"


def effects_sql(plan: PreviewPlan) -> str:
    """The EFFECTS_SQL query for `plan`'s target, relations and names (quoted as literals). Pure."""
    return EFFECTS_SQL.format(
        target=_literal(plan.target), read=_array(plan.reads), functions=_array(plan.functions),
        operators=_array((*plan.operators, *IMPLICIT_OPERATORS)),
        typecasts="true" if plan.typecasts else "false", types=_array(plan.types),
    )


def effects_refusal(not_tables: str | None, triggers: str | None, rules: str | None,
                    functions: str | None = None, row_security: str | None = None,
                    read_code: str | None = None, same_names: str | None = None) -> str | None:
    """Why the write is not run for a preview, given what EFFECTS_SQL found, or None. Pure."""
    if not_tables:
        return (f"it writes through {not_tables}, not a plain table (a view's or a foreign table's "
                "writes run code or reach outside the database)")
    if triggers:
        return f"it fires triggers ({triggers}), whose functions may do what a rollback does not undo"
    if rules:
        return f"it fires rules ({rules}), which run further statements"
    if functions:
        return (f"writing evaluates {functions} (a column default, generated column, constraint, domain "
                "or index), which is not a built-in: what it does outside the transaction could not be "
                "rolled back")
    if row_security:
        return f"row-level security on {row_security} runs its policies' expressions"
    if read_code:
        return f"it reads {read_code}, a view or foreign table (its definition runs code, or it reaches outside)"
    if same_names:
        return (f"the database has {same_names}, which the statement's own function, operator or cast "
                "names could resolve to instead of a built-in")
    return None


@dataclass(frozen=True)
class NoPreview:
    """The statement is not run for a preview; `reason` is shown to the reviewer."""

    reason: str


def _walk(node: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (node type, fields) pair of a parse tree in JSON form."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            for k, v in n.items():
                if isinstance(v, dict) and k[:1].isupper():
                    yield k, v
                stack.append(v)
        elif isinstance(n, list):
            stack.extend(n)


def _names(items: Any) -> list[str]:
    return [i.get("String", {}).get("sval", "") for i in items or () if isinstance(i, dict)]


def function_refusal(name: list[str], server_version: int = 0) -> str | None:
    """Why a call of function `name` (as written: schema-qualified or not) rules out a preview."""
    bare = name[-1] if name else ""
    schema = name[-2] if len(name) >= 2 else None
    shown = ".".join(name)
    if schema == "information_schema" and bare in fn.INFORMATION_SCHEMA_FUNCTIONS:
        return None
    if schema in (None, "pg_catalog"):
        if bare == "nextval" or bare in ("currval", "lastval"):
            return None
        if bare == "setval":
            return "it calls setval(), which sets a sequence for good (a rollback does not undo it)"
        if fn.is_builtin(bare, server_version):
            return None
    return (
        f"it calls {shown}(), which is not a built-in pgwarden vouches for as free of side effects: "
        "what it does outside the transaction could not be rolled back"
    )


def refusal(tree: dict[str, Any], server_version: int = 0) -> str | None:
    """Why one parsed statement (JSON form) must not be run for a preview, or None. Pure."""
    kind = next(iter(tree), "")
    if kind not in _DML:
        return "only INSERT, UPDATE, DELETE and MERGE are previewed"
    for node_type, fields in _walk(tree):
        if node_type == "FuncCall":
            why = function_refusal(_names(fields.get("funcname")), server_version)
            if why:
                return why
        elif node_type == "CurrentOfExpr":
            return "WHERE CURRENT OF names a cursor of the agent's own session, which the preview cannot see"
        elif node_type in _DML and fields is not tree[kind]:
            return "a data-modifying WITH: the preview would count only the outer statement's rows"
        elif node_type in ("CallStmt", "DoStmt"):
            return "it runs code the policy engine cannot see"
    return None


@dataclass(frozen=True)
class NamesUsed:
    """What a statement names that EFFECTS_SQL looks up among the database's own objects."""

    relations: tuple[str, ...]
    functions: tuple[str, ...]
    operators: tuple[str, ...]
    typecasts: bool
    types: tuple[str, ...]


def _names_used(tree: dict[str, Any]) -> NamesUsed:
    """The relations, functions, operators and cast types a parsed statement (JSON form) names.
    Functions include what PostgreSQL may read as functional notation: `t.f` and `(t).f` call
    f(t) when t has no column f, so the last name of a qualified column reference and every
    field selection count as function names too. Pure."""
    rels: set[str] = set()
    funcs: set[str] = set()
    ops: set[str] = set()
    types: set[str] = set()
    casts = False
    for node_type, fields in _walk(tree):
        if node_type == "RangeVar":
            parts = [fields.get(k) for k in ("catalogname", "schemaname", "relname")]
            rels.add(".".join(_quote(p) for p in parts if p))
        elif node_type == "FuncCall":
            funcs.update(_names(fields.get("funcname"))[-1:])
        elif node_type == "ColumnRef":
            names = [n for n in _names(fields.get("fields")) if n]
            funcs.update(names[-1:] if len(names) >= 2 else ())
        elif node_type == "A_Indirection":
            funcs.update(n for n in _names(fields.get("indirection")) if n)
        elif node_type == "A_Expr":
            ops.update(_names(fields.get("name"))[-1:])
        elif node_type == "SubLink":
            ops.update(_names(fields.get("operName"))[-1:])
        elif node_type == "SortBy":
            ops.update(_names(fields.get("useOp"))[-1:])
        elif node_type == "TypeCast":
            casts = True
            names = [n for n in _names((fields.get("typeName") or {}).get("names")) if n]
            if names:
                types.add(".".join(_quote(n) for n in names))
    return NamesUsed(tuple(sorted(rels)), tuple(sorted(funcs)), tuple(sorted(ops)), casts, tuple(sorted(types)))


def _uses_nextval(tree: dict[str, Any]) -> bool:
    return any(t == "FuncCall" and _names(f.get("funcname"))[-1:] == ["nextval"] for t, f in _walk(tree))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _star() -> ast.ResTarget:
    return ast.ResTarget(val=ast.ColumnRef(fields=(ast.A_Star(),)))


def _snapshot_join(stmt: Any) -> str:
    """UPDATE … FROM …, (SELECT tableoid, ctid, row FROM target) pgwarden_old WHERE … AND the target
    row is that snapshot row … RETURNING (pgwarden_old.row).*, target.*: each changed row with its
    old values. (tableoid, ctid) identifies one row version, across partitions too; the snapshot's
    columns sit inside one composite so no name in the statement becomes ambiguous."""
    rel = stmt.relation
    ref = rel.alias.aliasname if rel.alias is not None else rel.relname
    target = ".".join(_quote(p) for p in (rel.catalogname, rel.schemaname, rel.relname) if p)
    only = "" if rel.inh else "ONLY "
    template: Any = parse_sql(
        f"SELECT FROM (SELECT {SNAP}.tableoid AS {OLD_MARKERS[0]}, {SNAP}.ctid AS {OLD_MARKERS[1]}, "
        f"{SNAP} AS {OLD_ROW} FROM {only}{target} AS {SNAP}) AS {OLD_ALIAS} "
        f"WHERE {_quote(ref)}.tableoid = {OLD_ALIAS}.{OLD_MARKERS[0]} AND {_quote(ref)}.ctid = {OLD_ALIAS}.{OLD_MARKERS[1]} "
        f"RETURNING ({OLD_ALIAS}.{OLD_ROW}).*, {_quote(ref)}.*".replace(
            "SELECT FROM", "UPDATE pgwarden_x SET a = 1 FROM", 1
        )
    )[0].stmt
    stmt.fromClause = (*(stmt.fromClause or ()), *template.fromClause)
    cond = template.whereClause
    stmt.whereClause = (
        cond
        if stmt.whereClause is None
        else ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=(stmt.whereClause, cond))
    )
    stmt.returningClause = template.returningClause
    return f"SELECT * FROM {only}{target}"


def plan_preview(
    sql: str, server_version: int = 0, sample_rows: int = SAMPLE_ROWS
) -> PreviewPlan | NoPreview:
    """The text that measures what `sql` changes, or why it is not previewed."""
    try:
        tree = json.loads(parse_sql_json(sql))
        stmts = parse_sql(sql)
    except (ParseError, RecursionError, ValueError) as e:
        return NoPreview(f"the statement could not be parsed for a preview ({e})")
    raw = tree.get("stmts") or []
    if len(raw) != 1 or len(stmts) != 1:
        return NoPreview(f"the text holds {len(raw)} statements; only a single statement is previewed")
    why = refusal(raw[0].get("stmt") or {}, server_version)
    if why:
        return NoPreview(why)
    notes = (
        (
            "nextval() advances its sequence in the preview too (a rollback does not undo that): "
            "the numbers it took are skipped",
        )
        if _uses_nextval(raw[0].get("stmt") or {})
        else ()
    )
    stmt: Any = stmts[0].stmt
    kind = _KINDS[type(stmt).__name__]
    rel = stmt.relation
    target = ".".join(_quote(p) for p in (rel.catalogname, rel.schemaname, rel.relname) if p)
    used = _names_used(raw[0].get("stmt") or {})
    if kind == "merge" and server_version and server_version < 17:
        return PreviewPlan(
            kind,
            RawStream()(stmt),
            target=target, reads=used.relations, functions=used.functions, operators=used.operators,
            typecasts=used.typecasts, types=used.types, count_only=True,
            notes=(
                *notes,
                f"MERGE returns no rows before PostgreSQL 17 (the server is {server_version}): count only",
            ),
        )
    with_clause = stmt.withClause
    stmt.withClause = None
    before_sql = ""
    if kind == "update":
        before_sql = _snapshot_join(stmt)
    elif kind == "insert":
        stmt.returningClause = ast.ReturningClause(exprs=(_star(),))
    else:  # DELETE … USING, MERGE … USING: `*` would add the other relations' columns to the sample
        ref = rel.alias.aliasname if rel.alias is not None else rel.relname
        stmt.returningClause = ast.ReturningClause(
            exprs=(ast.ResTarget(val=ast.ColumnRef(fields=(ast.String(sval=ref), ast.A_Star()))),))
    outer: Any = parse_sql(
        f"WITH {CTE_NAME} AS (SELECT) SELECT (SELECT count(*) FROM {CTE_NAME}) AS {COUNT_COLUMN}, * "
        f"FROM {CTE_NAME} LIMIT {int(sample_rows)}"
    )[0].stmt
    cte = outer.withClause.ctes[0]
    cte.ctequery = stmt
    # the statement's own WITH queries move up a level, beside it: a data-modifying CTE must be at the top
    outer.withClause.ctes = (*(with_clause.ctes if with_clause is not None else ()), cte)
    outer.withClause.recursive = bool(with_clause is not None and with_clause.recursive)
    return PreviewPlan(kind, RawStream()(outer), notes=notes, before_sql=before_sql,
                       target=target, reads=used.relations, functions=used.functions,
                       operators=used.operators, typecasts=used.typecasts, types=used.types)
