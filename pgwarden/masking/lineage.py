"""Lineage: which result columns can carry a masked column's value, decided from the parse tree.

Masking by result-column *name* leaks through `upper(email)`, `row_to_json(c)`, a CTE, a view, a
UNION branch. Here every expression gets a `Taint` by walking the pglast tree with the catalog:

* CLEAR     — cannot carry a masked value;
* DIRECT    — is exactly a masked column's value (any alias, `*`, a view/CTE/subquery column, a
              UNION branch): gets the column's strategy;
* DERIVED   — computed from masked values (functions, operators, casts, aggregates, JSON):
              redacted whole, or the statement is denied (`derived: deny`);
* WHOLEROW  — a row of a relation with masked columns (`c`, `c.*` as a value, `ROW(...)`):
              follows `wholeRow`;
* UNKNOWN   — what the analysis cannot follow (unknown relation, opaque function): treated
              like DERIVED. Never passed in clear.

The walk also denies, with a PolicyDenied (42501) that names the column and the way out:
masked columns in WHERE / JOIN / ORDER BY / GROUP BY / HAVING / window / CASE WHEN / FILTER /
LIMIT (an oracle: `WHERE ssn LIKE '1%'`) unless `allowInPredicates`; writes that copy a masked
value elsewhere (INSERT … SELECT, UPDATE … SET, CREATE TABLE AS, SELECT INTO, COPY to a file);
functions that run SQL given as text or keep a value as a side effect (`set_config`, `setval`,
`pg_notify`, `pg_sleep` over masked data); code the analysis cannot see into (DO, CREATE
FUNCTION / TRIGGER / RULE, CALL); and DDL that would rename or copy a masked column away (a
RENAME, SET SCHEMA, a renamed schema, ATTACH PARTITION of a masked table).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pglast import ast, enums

from pgwarden.errors import PolicyDenied
from pgwarden.masking.catalog import Catalog, Relation
from pgwarden.masking.model import strongest
from pgwarden.masking.view import MaskingView

CLEAR, DIRECT, DERIVED, WHOLEROW, UNKNOWN = range(5)

T = TypeVar("T")


def present(value: T | None, what: str) -> T:
    """`value`, a child the parser always fills in, or a refusal when the tree lacks it.

    pglast types every child of a node as optional. A tree without one (a newer parser, a shape
    the analysis was not written for) cannot be vouched for, so it is refused with 42501 instead
    of being analysed as if the child were empty."""
    if value is None:
        raise PolicyDenied(
            f"masking: the statement's parse tree has no {what}: not analysed",
            hint="Write the statement in a plainer form (named columns and tables), or ask an "
                 "administrator to report the statement as a pgwarden bug.",
        )
    return value


@dataclass(frozen=True)
class Taint:
    kind: int = CLEAR
    strategy: str | None = None
    sources: frozenset[str] = frozenset()
    type_oid: int = 0

    @property
    def tainted(self) -> bool:
        return self.kind != CLEAR


CLEAR_T = Taint()


def union(a: Taint, b: Taint) -> Taint:
    """Two values that may land in the same result column (set operations, ambiguity)."""
    if not b.tainted:
        return a
    if not a.tainted:
        return b
    kind = max(a.kind, b.kind)
    sources = a.sources | b.sources
    if kind == DIRECT:
        strat: str | None
        if a.kind == DIRECT and b.kind == DIRECT and a.strategy != b.strategy:
            strat = strongest(a.strategy or "redact", b.strategy or "redact")
        else:
            strat = a.strategy if a.kind == DIRECT else b.strategy
        typ = a.type_oid if a.type_oid == b.type_oid else 0
        return Taint(DIRECT, strat, sources, typ)
    return Taint(kind, None, sources)


def derive(taints: Iterable[Taint]) -> Taint:
    """An expression computed from `taints`: any masked input makes the output DERIVED."""
    kind = CLEAR
    sources: frozenset[str] = frozenset()
    for t in taints:
        if t.kind:
            kind = max(kind, DERIVED if t.kind == DIRECT else t.kind)
            sources |= t.sources
    return CLEAR_T if kind == CLEAR else Taint(kind, None, sources)


@dataclass
class OutCol:
    """One output column of a relation or query; `spread` stands for zero or more columns."""

    name: str
    taint: Taint
    spread: bool = False


def spread(t: Taint) -> list[OutCol]:
    return [OutCol("?", t, True)]


@dataclass
class Rel:
    """A FROM item as name resolution sees it; `columns` None means unknown."""

    alias: str
    schema: str | None
    columns: list[OutCol] | None

    def whole_row(self) -> Taint:
        if self.columns is None:
            return Taint(UNKNOWN, None, frozenset({self.alias}))
        t = derive(c.taint for c in self.columns)
        return Taint(WHOLEROW, None, t.sources) if t.tainted else CLEAR_T

    def star(self) -> list[OutCol]:
        if self.columns is None:
            return spread(Taint(UNKNOWN, None, frozenset({self.alias})))
        return list(self.columns)


@dataclass
class Scope:
    parent: Scope | None = None
    rels: list[Rel] = field(default_factory=list)
    star: list[OutCol] = field(default_factory=list)
    ctes: dict[str, list[OutCol] | None] = field(default_factory=dict)

    def find_cte(self, name: str) -> tuple[bool, list[OutCol] | None]:
        s: Scope | None = self
        while s is not None:
            if name in s.ctes:
                return True, s.ctes[name]
            s = s.parent
        return False, None


# -- the plan the proxy gets ---------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnPlan:
    """What to do with one result column: action None (clear), a strategy, or 'derived'."""

    action: str | None
    spread: bool = False
    source: str = ""
    type_oid: int = 0


# SQL functions that run SQL given as text, or read a relation named by a string
SQL_TEXT_FUNCTIONS = frozenset({
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml",
    "cursor_to_xmlschema", "table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema",
    "schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema", "database_to_xml",
    "database_to_xmlschema", "database_to_xml_and_xmlschema", "ts_stat", "dblink", "dblink_exec",
    "dblink_open", "dblink_fetch", "dblink_send_query", "dblink_get_result", "query_to_json",
})
# functions that keep or signal a value outside the result (readable in clear afterwards)
SIDE_EFFECT_FUNCTIONS = frozenset({
    "set_config", "setval", "pg_notify", "pg_sleep", "pg_sleep_for", "pg_sleep_until",
    "lo_from_bytea", "lo_put", "lowrite", "lo_import", "lo_export", "pg_logical_emit_message",
    "pg_advisory_lock", "pg_advisory_xact_lock", "pg_try_advisory_lock", "pg_try_advisory_xact_lock",
    "pg_advisory_lock_shared", "pg_try_advisory_lock_shared", "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock_shared", "pg_file_write", "pg_file_rename", "raise_error",
})
# relations whose columns hold samples of other tables' values (planner statistics)
OPAQUE_RELATIONS = frozenset({
    ("pg_catalog", "pg_stats"), ("pg_catalog", "pg_stats_ext"), ("pg_catalog", "pg_stats_ext_exprs"),
    ("pg_catalog", "pg_statistic"), ("pg_catalog", "pg_statistic_ext_data"),
})
_OPAQUE_CODE = (ast.DoStmt, ast.CreateFunctionStmt, ast.CreateTrigStmt, ast.RuleStmt, ast.CallStmt,
                ast.CreateEventTrigStmt)
class _Reads(threading.local):
    count = 0


# Bumped whenever the analysis reads a literal's value (ORDER BY 2 names a column): a plan made
# without a bump is a function of the parse tree with literals blanked, and is cached by it.
LITERAL_READS = _Reads()

# Every table's system columns: where the row lives and which transactions wrote it, never a
# stored value (a table cannot have a column of these names; a subquery's alias that has one is
# found as that alias's column first).
SYSTEM_COLUMNS = frozenset({"tableoid", "ctid", "xmin", "xmax", "cmin", "cmax"})

_SESSION_STMTS = (ast.DeclareCursorStmt, ast.FetchStmt, ast.ClosePortalStmt, ast.PrepareStmt,
                  ast.ExecuteStmt, ast.DeallocateStmt)
_HINT = ("Select other columns, or ask an administrator for an exemption "
         "(MaskingRule exemptSubjects).")


class Analyzer:
    """One statement's walk; raises PolicyDenied at the first reason to refuse it."""

    def __init__(self, masking: MaskingView, catalog: Catalog, search_path: Sequence[str],
                 view_depth: int = 0, in_view: bool = False) -> None:
        self.m = masking
        self.catalog = catalog
        self.search_path = tuple(search_path)
        self.view_depth = view_depth
        self.in_view = in_view
        # every masked (or unknown) source an expression of the statement read, in any clause:
        # its errors and notices may echo those values (see errors_text.py)
        self.touched: set[str] = set()

    # -- denial --------------------------------------------------------------------------------

    def deny(self, what: str, t: Taint | None = None, hint: str = _HINT) -> PolicyDenied:
        rules = ", ".join(self.m.rule_names)
        if t is not None and t.sources:
            what = f"{what} ({', '.join(sorted(t.sources))} is masked)"
        return PolicyDenied(f"masking rule {rules}: {what}", hint=hint)

    def predicate(self, node: Any, scope: Scope, clause: str, outs: list[OutCol] | None = None) -> None:
        if node is None:
            return
        self.oracle(self.clause_taint(node, scope, outs), clause)

    def oracle(self, t: Taint, clause: str) -> None:
        """`t` decides which rows come back, how many, or in which order: a predicate on it.

        Not only WHERE: duplicate elimination (DISTINCT, UNION, INTERSECT, EXCEPT) compares values,
        JOIN … USING compares them, a set-returning function makes as many rows as its input says.
        """
        if t.tainted:
            self.touched.update(t.sources)
        if t.tainted and not self.m.allow_in_predicates and not self.in_view:
            raise self.deny(
                f"a masked value used in {clause} would reveal it through which rows come back, how many, "
                "or in which order",
                t,
                hint="Filter, join, sort, group and de-duplicate on columns that are not masked, or ask for "
                     "an exemption (MaskingRule exemptSubjects); allowInPredicates: true permits this at "
                     "the risk of value-guessing queries.",
            )

    def clause_taint(self, node: Any, scope: Scope, outs: list[OutCol] | None) -> Taint:
        """ORDER BY / GROUP BY items may name an output column by position or by its alias."""
        if isinstance(node, (list, tuple)):
            return derive(self.clause_taint(n, scope, outs) for n in node)
        if isinstance(node, ast.SortBy):
            return self.clause_taint(node.node, scope, outs)
        # ROLLUP / CUBE / GROUPING SETS and their parenthesised rows: every element may name an
        # output column by position, as a plain GROUP BY item does
        if isinstance(node, ast.GroupingSet):
            return derive(self.clause_taint(c, scope, outs) for c in node.content or ())
        if isinstance(node, ast.RowExpr):
            return derive(self.clause_taint(c, scope, outs) for c in node.args or ())
        if outs is not None and not any(o.spread for o in outs):
            if isinstance(node, ast.A_Const) and isinstance(node.val, ast.Integer):
                LITERAL_READS.count += 1  # the plan now depends on a literal: not constant-blind
                i = present(node.val.ival, "integer value")
                return outs[i - 1].taint if 0 < i <= len(outs) else CLEAR_T
            if isinstance(node, ast.ColumnRef):
                fields = present(node.fields, "column name")
                if len(fields) == 1 and isinstance(fields[0], ast.String):
                    name = fields[0].sval
                    by_out = [o.taint for o in outs if o.name == name]
                    t = self.expr(node, scope, allow_missing=True)
                    for b in by_out:
                        t = union(t, b)
                    return t
        elif outs is not None and isinstance(node, ast.A_Const):
            return derive(o.taint for o in outs)
        return self.expr(node, scope)

    # -- statements ----------------------------------------------------------------------------

    def statement(self, stmt: Any, session: Any) -> tuple[str, list[OutCol] | None, dict[str, Any]]:
        """(kind, output columns, extra) with kind rows | copy | none | fetch | execute."""
        if isinstance(stmt, ast.SelectStmt):
            outs = self.select(stmt, None)
            if stmt.intoClause is not None:
                self.no_copy(outs, "SELECT INTO would copy masked values into a new table")
                return "none", None, {}
            return "rows", outs, {}
        if isinstance(stmt, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)):
            outs = self.dml(stmt, None)
            return ("rows", outs, {}) if outs else ("none", None, {})
        if isinstance(stmt, ast.CopyStmt):
            return self.copy(stmt)
        if isinstance(stmt, ast.CreateTableAsStmt):
            outs = self.query(stmt.query, None)
            self.no_copy(outs, "CREATE TABLE AS would copy masked values into a new relation")
            return "none", None, {}
        if isinstance(stmt, ast.ViewStmt):
            # a view is analysed again when it is read; only its own filters must be refused here
            self.query(stmt.query, None)
            return "none", None, {}
        if isinstance(stmt, ast.VariableShowStmt):
            return "rows", [OutCol(stmt.name or "", CLEAR_T)], {}
        if isinstance(stmt, ast.ExplainStmt):
            self.query(stmt.query, None)
            return "rows", [OutCol("QUERY PLAN", CLEAR_T)], {}
        if isinstance(stmt, _OPAQUE_CODE):
            raise self.deny(
                f"{type(stmt).__name__.replace('Stmt', '')} runs code the masking analysis cannot "
                "see into, so it could move masked values", None,
                hint="Ask an administrator to run it, or for an exemption (MaskingRule exemptSubjects).")
        if isinstance(stmt, (ast.AlterTableStmt, ast.RenameStmt, ast.AlterObjectSchemaStmt)):
            self.check_alter(stmt)
            return "none", None, {}
        if isinstance(stmt, ast.DeclareCursorStmt):
            outs = self.query(stmt.query, None)
            return "none", None, {"declare": stmt.portalname, "outs": outs}
        if isinstance(stmt, ast.FetchStmt):
            return ("none" if stmt.ismove else "fetch"), None, {"cursor": stmt.portalname}
        if isinstance(stmt, ast.PrepareStmt):
            outs = self.query(stmt.query, None)
            return "none", None, {"prepare": stmt.name, "outs": outs}
        if isinstance(stmt, ast.ExecuteStmt):
            return "execute", None, {"prepared": stmt.name}
        return "none", None, {}

    def query(self, node: Any, outer: Scope | None) -> list[OutCol]:
        if isinstance(node, ast.SelectStmt):
            return self.select(node, outer)
        if isinstance(node, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)):
            return self.dml(node, outer)
        if node is None:
            return []
        return spread(Taint(UNKNOWN, None, frozenset({type(node).__name__})))

    def no_copy(self, outs: list[OutCol], what: str) -> None:
        t = derive(o.taint for o in outs)
        if t.tainted:
            raise self.deny(what, t, hint="Leave masked columns out of the copied values, or ask for "
                                          "an exemption (MaskingRule exemptSubjects).")

    def check_alter(self, stmt: Any) -> None:
        """A masking rule names its tables: DDL that gives a masked relation another name (RENAME,
        SET SCHEMA, a renamed schema) or lets its rows be read under another one (ATTACH
        PARTITION to a parent) would take its columns out of the rule."""
        if isinstance(stmt, ast.RenameStmt) and stmt.renameType == enums.ObjectType.OBJECT_SCHEMA:
            moved = sorted(f"{schema}.{table}" for schema, table in self.m.columns if schema == stmt.subname)
            if moved:
                raise self.deny(f"renaming schema {stmt.subname} would take {', '.join(moved)} out of the "
                                "masking rule", None, hint="Ask an administrator to change this schema.")
            return
        targets = [getattr(stmt, "relation", None)]
        for cmd in getattr(stmt, "cmds", None) or ():
            part = getattr(cmd, "def_", None)
            if isinstance(part, ast.PartitionCmd):  # its rows are read through the parent from then on
                targets.append(part.name)
        for rv in targets:
            if not isinstance(rv, ast.RangeVar):
                continue
            t = self.relation(rv, Scope()).whole_row()
            if t.tainted:
                raise self.deny(f"{type(stmt).__name__.replace('Stmt', '')} on a relation with masked columns "
                                "could rename or copy them out of the masking rule", t,
                                hint="Ask an administrator to change this table.")

    # -- SELECT --------------------------------------------------------------------------------

    def select(self, stmt: ast.SelectStmt, outer: Scope | None) -> list[OutCol]:
        scope = Scope(parent=outer)
        if stmt.withClause is not None:
            self.with_clause(stmt.withClause, scope)
        if stmt.op and stmt.op != enums.SetOperation.SETOP_NONE:
            left = self.select(present(stmt.larg, "left side of a set operation"), scope)
            right = self.select(present(stmt.rarg, "right side of a set operation"), scope)
            outs = merge_positional(left, right)
            if stmt.op != enums.SetOperation.SETOP_UNION or not stmt.all:
                op = stmt.op.name.removeprefix("SETOP_") + (" ALL" if stmt.all else "")
                self.oracle(derive(o.taint for o in left + right), f"{op} (it compares whole rows)")
            for item in stmt.sortClause or ():
                self.predicate(item, scope, "ORDER BY", outs)
            self.predicate(stmt.limitCount, scope, "LIMIT")
            self.predicate(stmt.limitOffset, scope, "OFFSET")
            return outs
        if stmt.valuesLists:
            outs = []
            for row in stmt.valuesLists:
                cols = [OutCol(f"column{i + 1}", self.expr(v, scope)) for i, v in enumerate(row)]
                outs = cols if not outs else merge_positional(outs, cols)
            return outs
        for item in stmt.fromClause or ():
            self.from_item(item, scope)
        self.predicate(stmt.whereClause, scope, "WHERE")
        outs = self.targets(stmt.targetList or (), scope)
        for item in stmt.groupClause or ():
            self.predicate(item, scope, "GROUP BY", outs)
        self.predicate(stmt.havingClause, scope, "HAVING")
        for item in stmt.sortClause or ():
            self.predicate(item, scope, "ORDER BY", outs)
        for item in stmt.distinctClause or ():
            if item is not None:
                self.predicate(item, scope, "DISTINCT ON", outs)
            else:  # plain DISTINCT: every output column is compared
                self.oracle(derive(o.taint for o in outs), "DISTINCT")
        for w in stmt.windowClause or ():
            self.window(w, scope, outs)
        self.predicate(stmt.limitCount, scope, "LIMIT")
        self.predicate(stmt.limitOffset, scope, "OFFSET")
        return outs

    def with_clause(self, wc: ast.WithClause, scope: Scope) -> None:
        if wc.recursive:  # every sibling is visible, also one defined later: unknown until analysed
            for cte in wc.ctes or ():
                scope.ctes[cte.ctename] = None
        for cte in wc.ctes or ():
            name = cte.ctename
            q = cte.ctequery
            if wc.recursive and isinstance(q, ast.SelectStmt) and q.op and q.op != enums.SetOperation.SETOP_NONE:
                scope.ctes[name] = None  # a self-reference while analysing the seed: unknown
                outs = rename(self.select(present(q.larg, "non-recursive term"), scope), cte.aliascolnames)
                # taints only grow, so this reaches a fixed point; a value can move one column
                # per recursion step, so stopping early would leave a column that carries it clear
                for _ in range(64):
                    scope.ctes[name] = outs
                    again = rename(self.select(q, scope), cte.aliascolnames)
                    merged = merge_positional(outs, again)
                    if [(o.taint, o.spread) for o in merged] == [(o.taint, o.spread) for o in outs]:
                        break
                    outs = merged
                else:  # no fixed point in time: any column may carry any of the values
                    worst = CLEAR_T
                    for o in outs:
                        worst = union(worst, o.taint)
                    outs = [OutCol(o.name, worst, o.spread) for o in outs]
                scope.ctes[name] = outs
            else:
                scope.ctes[name] = rename(self.query(q, scope), cte.aliascolnames)

    def window(self, w: ast.WindowDef, scope: Scope, outs: list[OutCol] | None) -> None:
        self.predicate(w.partitionClause, scope, "PARTITION BY", outs)
        self.predicate(w.orderClause, scope, "window ORDER BY", outs)
        self.predicate(w.startOffset, scope, "a window frame offset")
        self.predicate(w.endOffset, scope, "a window frame offset")

    def targets(self, items: Iterable[Any], scope: Scope) -> list[OutCol]:
        outs: list[OutCol] = []
        for rt in items:
            val = rt.val if isinstance(rt, ast.ResTarget) else rt
            if isinstance(val, ast.ColumnRef) and isinstance(present(val.fields, "column name")[-1], ast.A_Star):
                outs.extend(self.star(val, scope))
                continue
            if (isinstance(val, ast.A_Indirection) and val.indirection
                    and isinstance(val.indirection[-1], ast.A_Star)):
                rel = self.row_rel(val.arg, scope) if len(val.indirection) == 1 else None
                if rel is not None:
                    outs.extend(rel.star())
                else:
                    t = self.expr(val.arg, scope)
                    outs.extend(spread(Taint(DERIVED, None, t.sources) if t.kind == DIRECT else t))
                continue
            t = self.expr(val, scope)
            outs.append(OutCol(getattr(rt, "name", None) or output_name(val), t))
        return outs

    def star(self, ref: ast.ColumnRef, scope: Scope) -> list[OutCol]:
        names = [f.sval for f in present(ref.fields, "column name")[:-1]]
        if not names:
            return list(scope.star)
        rel = self.find_rel(names, scope)
        if rel is None:
            return spread(Taint(UNKNOWN, None, frozenset({".".join(names)})))
        return rel.star()

    def row_rel(self, node: Any, scope: Scope) -> Rel | None:
        """`(c).*`: the relation when `node` is a plain whole-row reference."""
        if isinstance(node, ast.ColumnRef):
            fields = present(node.fields, "column name")
            if not all(isinstance(f, ast.String) for f in fields):
                return None
            names = [f.sval for f in fields]
            if len(names) == 1 and self.lookup(names[0], scope) is not None:
                return None
            return self.find_rel(names, scope)
        return None

    # -- FROM ----------------------------------------------------------------------------------

    def from_item(self, item: Any, scope: Scope) -> list[OutCol]:
        """Add the item's relations to `scope`; returns its columns in `*` order."""
        if isinstance(item, ast.RangeVar):
            rel = self.relation(item, scope)
            scope.rels.append(rel)
            cols = rel.star()
        elif isinstance(item, ast.JoinExpr):
            cols = self.join(item, scope)
        elif isinstance(item, ast.RangeSubselect):
            sub = Scope(parent=scope)  # LATERAL or not: seeing earlier items can only add taint
            outs = self.query(item.subquery, sub)
            alias = present(item.alias.aliasname, "alias name") if item.alias else "?subquery"
            rel = Rel(alias, None, rename(outs, item.alias.colnames if item.alias else None))
            scope.rels.append(rel)
            cols = rel.star()
        elif isinstance(item, ast.RangeFunction):
            taints = []
            fname = "?function"
            for pair in item.functions or ():
                fn = pair[0] if isinstance(pair, (list, tuple)) else pair
                taints.append(self.expr(fn, scope))
                if isinstance(fn, ast.FuncCall):
                    fname = present(present(fn.funcname, "function name")[-1].sval, "function name")
            t = derive(taints)
            self.oracle(t, f"the set-returning function {fname}() in FROM")
            alias = present(item.alias.aliasname, "alias name") if item.alias else fname
            rel = Rel(alias, None, spread(t))
            scope.rels.append(rel)
            cols = rel.star()
        elif isinstance(item, ast.RangeTableSample):
            cols = self.from_item(item.relation, scope)
            self.predicate(item.args, scope, "TABLESAMPLE")
        else:  # XMLTABLE, JSON_TABLE and what a newer parser may add: columns of unknown lineage
            t = self.generic(item, scope)
            what = {"RangeTableFunc": "XMLTABLE", "JsonTable": "JSON_TABLE"}.get(type(item).__name__,
                                                                               type(item).__name__)
            self.oracle(t, f"{what} (its rows come from the masked document)")
            alias = getattr(getattr(item, "alias", None), "aliasname", None) or "?"
            rel = Rel(alias, None, spread(t if t.tainted else CLEAR_T))
            scope.rels.append(rel)
            cols = rel.star()
        scope.star.extend(cols)
        return cols

    def join(self, j: ast.JoinExpr, scope: Scope) -> list[OutCol]:
        mark = len(scope.star)
        left = self.from_item(j.larg, scope)
        right = self.from_item(j.rarg, scope)
        del scope.star[mark:]  # from_item appended both sides; the join decides the order
        using = [u.sval for u in j.usingClause or ()]
        if j.isNatural:
            if any(c.spread for c in left + right):
                cols = spread(derive(c.taint for c in left + right) if any(
                    c.taint.tainted for c in left + right) else CLEAR_T)
                for c in left + right:
                    if c.taint.tainted and c.taint.kind == DIRECT:
                        cols = spread(union(cols[0].taint, c.taint))
                # which columns the join compares is unknown: any of them may be masked
                self.oracle(cols[0].taint, "NATURAL JOIN")
                using = []
            else:
                rnames = {c.name for c in right}
                using = [c.name for c in left if c.name in rnames]
        if using:
            merged = []
            for name in using:
                t = CLEAR_T
                for c in left + right:
                    if c.name == name or c.spread:
                        t = union(t, c.taint)
                merged.append(OutCol(name, t))
                self.oracle(t, "NATURAL JOIN" if j.isNatural else "JOIN … USING")
            cols = merged + [c for c in left if c.name not in using or c.spread] + [
                c for c in right if c.name not in using or c.spread]
        elif not j.isNatural or not any(c.spread for c in left + right):
            cols = left + right
        self.predicate(j.quals, scope, "JOIN ON")
        if j.alias is not None:
            scope.rels.append(Rel(present(j.alias.aliasname, "alias name"), None, rename(cols, j.alias.colnames)))
        if j.join_using_alias is not None:
            scope.rels.append(Rel(present(j.join_using_alias.aliasname, "alias name"), None,
                                  [c for c in cols if c.name in using]))
        return cols

    def relation(self, rv: ast.RangeVar, scope: Scope) -> Rel:
        relname = present(rv.relname, "relation name")
        alias = present(rv.alias.aliasname, "alias name") if rv.alias else relname
        colnames = rv.alias.colnames if rv.alias else None
        if not rv.schemaname:
            found, cte = scope.find_cte(relname)
            if found:
                cols = cte if cte is not None else spread(Taint(UNKNOWN, None, frozenset({relname})))
                return Rel(alias, None, rename(list(cols), colnames))
            rel, candidates = self.catalog.resolve(relname, self.search_path)
        else:
            rel = self.catalog.get(rv.schemaname, relname)
            candidates = [rel] if rel else []
        schema = None if rv.alias else (rel.schema if rel else rv.schemaname)
        if rel is None:
            return Rel(alias, schema, None)
        cols = self.relation_columns(rel)
        if not rv.schemaname:
            # search_path may differ from what we were told: merge every same-named relation that
            # masks something, so an unqualified name never resolves to fewer masks than it could
            for other in candidates:
                if other is rel:
                    continue
                ocols = {c.name: c.taint for c in self.relation_columns(other) if not c.spread}
                if any(t.tainted for t in ocols.values()):
                    cols = [OutCol(c.name, union(c.taint, ocols.get(c.name, CLEAR_T)), c.spread) for c in cols]
                    extra = [t for n, t in ocols.items() if t.tainted and n not in {c.name for c in cols}]
                    if extra:
                        cols = [OutCol(c.name, union(c.taint, Taint(DERIVED, None, derive(extra).sources)),
                                       c.spread) for c in cols]
        return Rel(alias, schema, rename(cols, colnames))

    def relation_columns(self, rel: Relation) -> list[OutCol]:
        if (rel.schema, rel.name) in OPAQUE_RELATIONS and self.m.has_columns:
            src = frozenset({rel.qualified})
            return [OutCol(c, Taint(DERIVED, None, src)) for c in rel.columns]
        if rel.view_sql is not None:
            return self.view_columns(rel)
        out = []
        for i, c in enumerate(rel.columns):
            strat = self.m.column_strategy(rel, c)
            if strat is None:
                out.append(OutCol(c, CLEAR_T))
            else:
                typ = rel.type_oids[i] if i < len(rel.type_oids) else 0
                out.append(OutCol(c, Taint(DIRECT, strat, frozenset({f"{rel.qualified}.{c}"}), typ)))
        return out

    def view_columns(self, rel: Relation) -> list[OutCol]:
        key = (self.catalog.version, rel.schema, rel.name)
        hit = self.m.view_cache.get(key, touch=True)
        if hit is not None:
            cached, reads = hit
            # what the view's own clauses read (its WHERE may cast a masked column): its errors too
            self.touched.update(reads)
            return list(cached)
        unknown = Taint(UNKNOWN, None, frozenset({rel.qualified}))
        if self.view_depth > 16:
            return [OutCol(c, unknown) for c in rel.columns] or spread(unknown)
        sub = Analyzer(self.m, self.catalog, ("public",), self.view_depth + 1, in_view=True)
        try:
            from pglast import parse_sql

            stmts = parse_sql(rel.view_sql or "")
            outs = sub.query(stmts[0].stmt, None) if len(stmts) == 1 else spread(unknown)
        except PolicyDenied:
            raise
        except Exception:  # noqa: BLE001 - a definition we cannot parse is unknown, not clear
            outs = spread(unknown)
        if not rel.columns:
            cols = outs
        elif not any(o.spread for o in outs) and len(outs) == len(rel.columns):
            cols = [OutCol(n, o.taint) for n, o in zip(rel.columns, outs, strict=True)]
        else:  # shapes disagree: every view column may be any output
            worst = derive(o.taint for o in outs)
            cols = [OutCol(n, worst) for n in rel.columns]
        self.m.view_cache.put(key, (cols, frozenset(sub.touched)))
        self.touched.update(sub.touched)
        return list(cols)

    # -- DML -----------------------------------------------------------------------------------

    def dml(self, stmt: Any, outer: Scope | None) -> list[OutCol]:
        scope = Scope(parent=outer)
        if getattr(stmt, "withClause", None) is not None:
            self.with_clause(stmt.withClause, scope)
        if isinstance(stmt, ast.MergeStmt):
            target = self.relation(present(stmt.relation, "target table"), scope)
            src_scope = Scope(parent=scope)
            self.from_item(stmt.sourceRelation, src_scope)
            t = derive([target.whole_row(), *(r.whole_row() for r in src_scope.rels)])
            if t.tainted:
                raise self.deny("MERGE over relations with masked columns is not analysed", t,
                                hint="Use INSERT / UPDATE statements that leave masked columns out.")
            return []
        target_rv = present(stmt.relation, "target table")
        target = self.relation(target_rv, scope)
        scope.rels.append(target)
        scope.star.extend(target.star())
        if isinstance(stmt, ast.InsertStmt):
            name = target_rv.relname
            for rt in stmt.cols or ():  # a subscript (col[(SELECT …)]) decides where a value lands
                self.no_copy([OutCol("", self.expr(rt.indirection, scope))],
                             f"INSERT into {name} would copy masked values")
            if stmt.selectStmt is not None:
                outs = self.query(stmt.selectStmt, Scope(parent=outer, ctes=scope.ctes))
                self.no_copy(outs, f"INSERT into {name} would copy masked values")
            occ = stmt.onConflictClause
            if occ is not None:
                scope.rels.append(Rel("excluded", None, [OutCol(c.name, CLEAR_T) for c in target.star()]))
                for rt in occ.targetList or ():
                    self.no_copy([OutCol("", self.expr([rt.val, rt.indirection], scope))],
                                 f"ON CONFLICT DO UPDATE of {name} would copy masked values")
                self.predicate(occ.whereClause, scope, "ON CONFLICT WHERE")
        elif isinstance(stmt, ast.UpdateStmt):
            for item in stmt.fromClause or ():
                self.from_item(item, scope)
            self.predicate(stmt.whereClause, scope, "WHERE")
            for rt in stmt.targetList or ():
                val = rt.val.source if isinstance(rt.val, ast.MultiAssignRef) else rt.val
                self.no_copy([OutCol("", self.expr([val, rt.indirection], scope))],
                             f"UPDATE … SET {rt.name} would copy masked values")
        elif isinstance(stmt, ast.DeleteStmt):
            for item in stmt.usingClause or ():
                self.from_item(item, scope)
            self.predicate(stmt.whereClause, scope, "WHERE")
        return self.targets(returning(stmt), scope)

    # -- COPY ----------------------------------------------------------------------------------

    def copy(self, stmt: ast.CopyStmt) -> tuple[str, list[OutCol] | None, dict[str, Any]]:
        if stmt.is_from:
            return "none", None, {}
        opts = copy_options(stmt.options)
        if stmt.query is not None:
            outs = self.query(stmt.query, None)
        else:
            scope = Scope()
            rel = self.relation(present(stmt.relation, "table"), scope)
            cols = rel.star()
            if stmt.attlist:
                wanted = [a.sval for a in stmt.attlist]
                by_name = {c.name: c for c in cols if not c.spread}
                sp = [c.taint for c in cols if c.spread]
                outs = [by_name.get(n) or OutCol(n, derive(sp) if sp else Taint(UNKNOWN)) for n in wanted]
            else:
                outs = cols
        t = derive(o.taint for o in outs)
        if stmt.filename is not None or stmt.is_program:
            if t.tainted:
                raise self.deny("COPY to a server file or program would write masked values in clear", t,
                                hint="COPY … TO STDOUT gets masked output.")
            return "none", None, {}
        if "encoding" in opts and not is_utf8(opts["encoding"]):
            # rows are masked as UTF-8 text: in another encoding a delimiter or quote byte can sit
            # inside a character, and the field boundaries the proxy finds are not the server's
            raise self.deny(f"COPY … ENCODING {opts['encoding']!r} is not supported: pgwarden keeps the "
                            "client encoding at UTF8 to mask COPY data", None,
                            hint="Leave out the ENCODING option (the data arrives as UTF8) and convert "
                                 "it on your side.")
        if "header" in opts and opts["header"] not in (True, False):
            raise self.deny(f"COPY … TO with HEADER {'MATCH' if opts['header'] == 'match' else 'of that value'} "
                            "is not accepted", None,
                            hint="Write HEADER, HEADER true or HEADER false (MATCH is for COPY … FROM).")
        if opts.get("format") == "binary" and (t.tainted or self.m.detectors):
            raise self.deny("COPY in binary format cannot be masked", t if t.tainted else None,
                            hint="Use COPY … TO STDOUT (FORMAT text) or (FORMAT csv).")
        if t.tainted and opts.get("format", "text") == "text" and opts.get("null", "\\N") != "\\N":
            # text format does not escape a value equal to the NULL string: it would pass as NULL,
            # unmasked, and confirm a guess (NULL '123-45-6789')
            raise self.deny("COPY in text format with a NULL string cannot tell a masked value equal to it "
                            "from a NULL", t, hint="Leave out the NULL option, or use FORMAT csv.")
        return "copy", outs, {"options": opts}

    # -- expressions ---------------------------------------------------------------------------

    def expr(self, node: Any, scope: Scope, allow_missing: bool = False) -> Taint:
        t = self._expr(node, scope, allow_missing)
        if t.kind:
            self.touched.update(t.sources)
        return t

    def _expr(self, node: Any, scope: Scope, allow_missing: bool = False) -> Taint:
        if node is None:
            return CLEAR_T
        if isinstance(node, (list, tuple)):
            return derive(self.expr(n, scope) for n in node)
        if isinstance(node, ast.ColumnRef):
            return self.column_ref(node, scope, allow_missing)
        if isinstance(node, (ast.A_Const, ast.ParamRef, ast.SQLValueFunction, ast.CurrentOfExpr,
                             ast.SetToDefault, ast.TypeName)):
            return CLEAR_T
        if isinstance(node, ast.SubLink):
            return self.sublink(node, scope)
        if isinstance(node, ast.FuncCall):
            return self.func(node, scope)
        if isinstance(node, ast.CaseExpr):
            for w in node.args or ():
                self.predicate(w.expr, scope, "CASE WHEN")
            return self.generic(node, scope)
        if isinstance(node, ast.RowExpr):
            t = derive(self.expr(a, scope) for a in node.args or ())
            return Taint(WHOLEROW, None, t.sources) if t.tainted and t.kind < WHOLEROW else t
        if isinstance(node, ast.A_Indirection):
            if node.indirection and isinstance(node.indirection[0], ast.String):
                rel = self.row_rel(node.arg, scope)
                if rel is not None and rel.columns is not None:
                    name = node.indirection[0].sval
                    hits = [c.taint for c in rel.columns if c.name == name or c.spread]
                    t = CLEAR_T
                    for h in hits:
                        t = union(t, h)
                    if not hits:
                        t = rel.whole_row()
                    if len(node.indirection) == 1:
                        return t
                    return derive([t, self.expr(node.indirection[1:], scope)])
            return self.generic(node, scope)
        if isinstance(node, (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)):
            return derive(o.taint for o in self.query(node, scope))
        return self.generic(node, scope)

    def generic(self, node: Any, scope: Scope) -> Taint:
        """Any other node: its value is derived from every expression below it."""
        children = []
        for slot in node.__slots__:
            v = getattr(node, slot, None)
            if isinstance(v, (ast.Node, list, tuple)):
                children.append(self.expr(v, scope))
        return derive(children)

    def sublink(self, node: ast.SubLink, scope: Scope) -> Taint:
        outs = self.query(node.subselect, scope)
        kind = node.subLinkType
        if kind == enums.SubLinkType.EXISTS_SUBLINK:
            return CLEAR_T
        if kind == enums.SubLinkType.EXPR_SUBLINK and len(outs) == 1 and not outs[0].spread:
            return outs[0].taint
        return derive([self.expr(node.testexpr, scope), *(o.taint for o in outs)])

    def func(self, node: ast.FuncCall, scope: Scope) -> Taint:
        parts = present(node.funcname, "function name")
        names = [present(n.sval, "function name").lower() for n in parts if isinstance(n, ast.String)]
        name = names[-1] if names else ""
        schema = names[-2] if len(names) > 1 else None
        args = [self.expr(a, scope) for a in node.args or ()]
        if node.agg_filter is not None:
            self.predicate(node.agg_filter, scope, "FILTER (WHERE …)")
        if node.agg_order:
            self.predicate(node.agg_order, scope, "an aggregate's ORDER BY")
        if node.over is not None:
            self.window(node.over, scope, None)
        t = derive(args)
        if t.tainted and (self.catalog.set_returning(schema, name) or self.catalog.unknown_function(name)):
            # as many rows as the masked input says: generate_series(1, ascii(ssn)), regexp_matches
            self.oracle(t, f"the set-returning function {name}()")
        if self.m.has_columns and name in SQL_TEXT_FUNCTIONS:
            raise self.deny(f"{name}() runs SQL given as text, which the masking analysis cannot follow",
                            None, hint="Write the query directly; masked columns are then masked.")
        if t.tainted and name in SIDE_EFFECT_FUNCTIONS:
            raise self.deny(f"{name}() would keep or signal a masked value outside the result", t)
        if self.m.has_columns and self.catalog.user_function(schema, name, self.search_path):
            t = derive([t, Taint(UNKNOWN, None, frozenset({f"function {'.'.join(names)}()"}))])
        return t

    def column_ref(self, node: ast.ColumnRef, scope: Scope, allow_missing: bool = False) -> Taint:
        fields = present(node.fields, "column name")
        if isinstance(fields[-1], ast.A_Star):  # c.* as a value: a whole row
            names = [f.sval for f in fields[:-1]]
            if not names:
                t = derive(c.taint for c in scope.star)
                return Taint(WHOLEROW, None, t.sources) if t.tainted and t.kind < WHOLEROW else t
            rel = self.find_rel(names, scope)
            return rel.whole_row() if rel else Taint(UNKNOWN, None, frozenset({".".join(names)}))
        names = [f.sval for f in fields]
        if len(names) == 1:
            hit = self.lookup(names[0], scope)
            if hit is not None:
                return hit
            rel = self.find_rel(names, scope)
            if rel is not None:
                return rel.whole_row()
            if allow_missing or names[0] in SYSTEM_COLUMNS:
                return CLEAR_T
            return Taint(UNKNOWN, None, frozenset({names[0]}))
        rel = self.find_rel(names[:-1], scope)
        if rel is None:
            return Taint(UNKNOWN, None, frozenset({".".join(names)}))
        if rel.columns is None:
            return Taint(UNKNOWN, None, frozenset({".".join(names)}))
        t = CLEAR_T
        found = False
        for c in rel.columns:
            if c.name == names[-1] and not c.spread:
                t, found = union(t, c.taint), True
        if not found:
            for c in rel.columns:
                if c.spread:
                    t, found = union(t, c.taint), True
        if not found and names[-1] in SYSTEM_COLUMNS:
            return CLEAR_T  # a table's own bookkeeping (psql's \dL joins on l.tableoid): no row data
        return t if found else Taint(UNKNOWN, None, frozenset({".".join(names)}))

    def lookup(self, name: str, scope: Scope) -> Taint | None:
        """An unqualified column name; None when no relation in any scope can supply it."""
        acc: Taint | None = None
        s: Scope | None = scope
        while s is not None:
            matches: list[Taint] = []
            maybe: list[Taint] = []
            for rel in s.rels:
                if rel.columns is None:
                    maybe.append(Taint(UNKNOWN, None, frozenset({f"{rel.alias}.{name}"})))
                    continue
                for c in rel.columns:
                    if c.spread:
                        maybe.append(c.taint)
                    elif c.name == name:
                        matches.append(c.taint)
            if matches:
                t = matches[0]
                for m in matches[1:]:
                    t = union(t, m)
                return t if acc is None else union(acc, t)
            for m in maybe:
                acc = m if acc is None else union(acc, m)
            s = s.parent
        return acc

    def find_rel(self, names: list[str], scope: Scope) -> Rel | None:
        """`alias`, `table`, `schema.table` or `db.schema.table`, innermost scope first."""
        if len(names) > 2:
            names = names[-2:]
        rname = names[-1]
        schema = names[0] if len(names) == 2 else None
        s: Scope | None = scope
        while s is not None:
            for rel in reversed(s.rels):
                if rel.alias == rname and (schema is None or rel.schema == schema):
                    return rel
            s = s.parent
        return None


def returning(stmt: Any) -> Sequence[Any]:
    """RETURNING items (`returningList` before PostgreSQL 18, `returningClause.exprs` since)."""
    rc = getattr(stmt, "returningClause", None)
    if rc is not None:
        return tuple(rc.exprs or ())
    return tuple(getattr(stmt, "returningList", None) or ())


def rename(cols: list[OutCol], colnames: Any) -> list[OutCol]:
    if not colnames:
        return cols
    new = [present(c.sval, "column alias") if isinstance(c, ast.String) else str(c) for c in colnames]
    if any(c.spread for c in cols):
        return cols
    return [OutCol(new[i] if i < len(new) else c.name, c.taint) for i, c in enumerate(cols)]


def merge_positional(left: list[OutCol], right: list[OutCol]) -> list[OutCol]:
    if any(c.spread for c in left + right) or len(left) != len(right):
        t = CLEAR_T
        for c in left + right:
            t = union(t, c.taint)
        return spread(t)
    return [OutCol(a.name, union(a.taint, b.taint)) for a, b in zip(left, right, strict=True)]


def output_name(node: Any) -> str:
    """PostgreSQL's default output column name, close enough for CTE and view column lookup."""
    if isinstance(node, ast.ColumnRef):
        last = present(node.fields, "column name")[-1]
        return str(last.sval) if isinstance(last, ast.String) else "?column?"
    if isinstance(node, ast.FuncCall):
        return str(present(node.funcname, "function name")[-1].sval)
    if isinstance(node, ast.TypeCast):
        inner = output_name(node.arg)
        if inner != "?column?":
            return inner
        return str(present(present(node.typeName, "type name").names, "type name")[-1].sval)
    if isinstance(node, ast.A_Indirection):
        last = present(node.indirection, "field name")[-1]
        return str(last.sval) if isinstance(last, ast.String) else "?column?"
    return "?column?"


def copy_bool(val: Any) -> bool | str | None:
    """A COPY boolean read as PostgreSQL's defGetBoolean reads it (HEADER also takes MATCH):
    True / False, "match", or None when the server would refuse the value."""
    if isinstance(val, bool):
        return val
    if isinstance(val, int):
        return {0: False, 1: True}.get(val)
    if isinstance(val, str):
        v = val.lower()
        if v in ("true", "on", "1"):
            return True
        if v in ("false", "off", "0"):
            return False
        if v == "match":
            return "match"
    return None


def is_utf8(name: Any) -> bool:
    """PostgreSQL's spellings of UTF8 (it ignores case, '-' and '_' in encoding names)."""
    return isinstance(name, str) and name.lower().replace("-", "").replace("_", "") in ("utf8", "unicode")


def copy_options(options: Any) -> dict[str, Any]:
    """COPY's options as plain values: format, delimiter, null, header, quote, escape, encoding.
    `header` is read as the server reads it (`copy_bool`)."""
    out: dict[str, Any] = {}
    for o in options or ():
        if not isinstance(o, ast.DefElem):
            continue
        arg = o.arg
        if arg is None:
            val: Any = True
        elif isinstance(arg, ast.String):
            val = arg.sval
        elif isinstance(arg, ast.Integer):
            val = arg.ival
        elif isinstance(arg, ast.Boolean):
            val = arg.boolval
        else:
            val = arg
        name = present(o.defname, "COPY option name").lower()
        if name == "format" and isinstance(val, str):
            val = val.lower()
        elif name == "header":
            val = copy_bool(val)
        out[name] = val
    return out
