"""The masking that applies to one caller, and the plans it makes for their statements.

Order of calls in the proxy (one `SubjectMasking` per session, from `MaskingSet.for_identity`):

1. Query / Parse: `plan = masking.plan(sql, catalog, search_path, session)` — raises
   PolicyDenied (42501) to refuse the statement; `plan.results[i]` belongs to the i-th
   statement of the text (advance on CommandComplete / EmptyQueryResponse).
2. RowDescription (or the Describe that preceded a Bind/Execute):
   `rewriter = plan.results[i].bind(fields, formats)`; None means pass DataRows untouched.
3. DataRow: `rewriter.rewrite(payload)`. CopyOutResponse: `plan.results[i].copy_rewriter(n)`,
   then `.rewrite(payload)` for each CopyData.
4. ErrorResponse / NoticeResponse: `masking.mask_error_fields(fields, plan)`.
5. After CommandComplete of a plan with `plan.ddl`: `CatalogCache.mark_stale()` and refresh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pglast import ast, parse_sql
from pglast.parser import ParseError

from pgwarden.cache import BoundedCache
from pgwarden.errors import PolicyDenied
from pgwarden.masking import lineage as ln
from pgwarden.masking.catalog import UNKNOWN, Catalog, Relation
from pgwarden.masking.copy import make_copy_rewriter
from pgwarden.masking.detectors import Detector, DetectorSet
from pgwarden.masking.errors_text import mask_error_fields as _mask_error_fields
from pgwarden.masking.model import MaskingRule, strongest
from pgwarden.masking.rows import make_row_rewriter
from pgwarden.masking.strategies import strategy_function
from pgwarden.pgwire import Field

# statements that change what a relation or column is (catalog read again after them); RuleStmt: a
# rule can make a relation read from another, ImportForeignSchema makes foreign tables; DO and
# CALL run code that may do any of it
_DDL_PREFIXES = ("Create", "Alter", "Drop", "Rename", "View", "Index", "Comment", "Grant", "Refresh", "Rule", "Import",
                 "Do", "Call")


def changes_schema(node_name: str) -> bool:
    """A statement of this parse-node type (`ViewStmt`, `AlterTableStmt`, …) changes what a
    relation or column is: masking plans made before it may not hold after it."""
    return node_name.startswith(_DDL_PREFIXES)


@dataclass
class MaskingSession:
    """Per-connection state for SQL-level cursors and prepared statements (DECLARE, PREPARE)."""

    cursors: dict[str, list[ln.OutCol]] = field(default_factory=dict)
    prepared: dict[str, list[ln.OutCol]] = field(default_factory=dict)


_NO_REWRITER = object()  # a rewriter cache miss (a cached None means: pass rows untouched)


@dataclass
class ResultPlan:
    """What one statement returns, column by column; `kind` is rows, copy or none."""

    kind: str
    columns: tuple[ln.ColumnPlan, ...]
    masking: SubjectMasking
    catalog: Catalog
    copy_options: Mapping[str, Any] = field(default_factory=dict)
    # ("declare" | "prepare", name, lineage of its rows) when the statement makes a cursor or a
    # prepared statement: the proxy's session registry keeps it once the server confirms it
    names: tuple[tuple[str, str, Any], ...] = ()
    # row rewriters by the RowDescription they were made for: a RowRewriter keeps no state
    # between rows, and a cached plan meets the same fields statement after statement
    _rewriters: BoundedCache[Any, Any] = field(default_factory=lambda: BoundedCache(16), compare=False, repr=False)
    # the last (fields, formats, rewriter) bound, by identity
    _last: tuple[Any, Any, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def masks_anything(self) -> bool:
        return any(c.action is not None for c in self.columns)

    def actions(self, n: int) -> list[str | None]:
        """The plan laid over `n` actual columns (spreads absorb the difference)."""
        if self.kind == "none":
            # rows from a statement we did not expect to return any: fail closed
            return [("derived" if self.masking.has_columns else None)] * n
        return expand(self.columns, n)

    def bind(self, fields: Sequence[Sequence[Any]], formats: Sequence[int] | None = None) -> Any:
        """A RowRewriter for these RowDescription fields, or None: pass DataRows untouched.

        `formats` are the Bind message's result-format codes when the fields came from a
        Describe of the statement (whose formats are all 0): none = text, one = for all.
        """
        if self.kind == "copy":  # a CopyRewriter keeps partial lines: one per result
            return self.copy_rewriter(len(fields) or None)
        # the same fields object again (a prepared statement's Describe, Bind after Bind): no key to
        # build and hash. Kept only for tuples, which nobody can change after the rewriter was made
        last = self._last
        if last is not None and last[0] is fields and last[1] is formats:
            return last[2]
        key: Any = (tuple(fields), tuple(formats) if formats else ())
        try:
            hit = self._rewriters.get(key, _NO_REWRITER)
        except TypeError:  # unhashable fields: made afresh
            return self._make_rewriter(fields, formats)
        if hit is _NO_REWRITER:
            hit = self._make_rewriter(fields, formats)
            self._rewriters.put(key, hit)
        if type(fields) is tuple and (formats is None or type(formats) is tuple):
            self._last = (fields, formats, hit)
        return hit

    def _make_rewriter(self, fields: Sequence[Sequence[Any]], formats: Sequence[int] | None) -> Any:
        fs = [_field(f) for f in fields]
        if formats:
            fmts = list(formats) * len(fs) if len(formats) == 1 else list(formats)
            fs = [f._replace(format=fmts[i] if i < len(fmts) else 0) for i, f in enumerate(fs)]
        actions = confirmed_by_server(self.actions(len(fs)), fs, self.catalog, self.masking)
        return make_row_rewriter(actions, fs, self.masking, self.catalog)

    def copy_rewriter(self, column_count: int | None = None) -> Any:
        """A CopyRewriter for COPY … TO STDOUT (text / csv), or None to pass CopyData through."""
        n = column_count if column_count is not None else sum(1 for c in self.columns if not c.spread)
        actions = self.actions(n)
        types = expand_types(self.columns, n)
        return make_copy_rewriter(actions, types, self.copy_options, self.masking)


def _field(f: Any) -> Field:
    if isinstance(f, Field):
        return f
    if hasattr(f, "type_oid"):
        return Field(f.name, f.table_oid, f.attnum, f.type_oid, f.typlen, f.typmod, f.format)
    return Field(*f)


def expand(columns: Sequence[ln.ColumnPlan], n: int) -> list[str | None]:
    fixed = [c for c in columns if not c.spread]
    spreads = [i for i, c in enumerate(columns) if c.spread]
    worst: str | None = None
    if any(c.action is not None for c in columns):
        worst = "derived"
    if not spreads:
        if len(fixed) == n:
            return [c.action for c in columns]
        return [worst] * n  # the shape is not what we analysed: mask whatever could be masked
    extra = n - len(fixed)
    if extra < 0:
        return [worst] * n
    first, last = spreads[0], spreads[-1]
    head = [c.action for c in columns[:first]]
    tail = [c.action for c in columns[last + 1:]]
    middle_cols = columns[first:last + 1]
    middle_len = n - len(head) - len(tail)
    if len(spreads) == 1:
        return head + [columns[first].action] * middle_len + tail
    mid_worst = None
    if any(c.action is not None for c in middle_cols):
        mid_worst = "derived"
    return head + [mid_worst] * middle_len + tail


def redeclared(old: list[ln.OutCol] | None, new: list[ln.OutCol]) -> list[ln.OutCol]:
    """A cursor or statement name declared again while the session still knows it. The server may
    have refused the new one (the name exists: `DECLARE c` inside a savepoint, then `ROLLBACK TO`)
    and kept the old, so the name takes the masks of both."""
    if old is None:
        return new
    if len(old) == len(new) and not any(c.spread for c in (*old, *new)):
        return [ln.OutCol(n.name, ln.union(o.taint, n.taint)) for o, n in zip(old, new, strict=True)]
    t = ln.derive(c.taint for c in (*old, *new))
    return ln.spread(t) if t.tainted else new


def kind_was_session(extra: Mapping[str, Any]) -> bool:
    return "cursor" in extra or "prepared" in extra


def expand_types(columns: Sequence[ln.ColumnPlan], n: int) -> list[int]:
    if not any(c.spread for c in columns) and len(columns) == n:
        return [c.type_oid for c in columns]
    return [0] * n


@dataclass
class StatementPlan:
    """The plan for one query text: one ResultPlan per statement, in order.

    `error` is set (and `results` empty) when the text must be refused: the proxy answers with
    it instead of forwarding anything.
    """

    results: tuple[ResultPlan, ...]
    ddl: bool = False
    touches_masked: bool = False
    error: PolicyDenied | None = None
    masking: SubjectMasking | None = None
    catalog: Catalog | None = None
    masked_sources: frozenset[str] = frozenset()  # what `touches_masked` read, for error messages
    # filed by its literal-blind tree: every text of that tree gets this plan (under this catalog
    # snapshot and search_path), so a caller may keep it for the next text of the same shape
    by_shape: bool = False

    def __getitem__(self, i: int) -> ResultPlan:
        return self.results[i]

    def __len__(self) -> int:
        return len(self.results)

    @cached_property
    def masks_anything(self) -> bool:
        """False: nothing the server answers to this text (rows, errors, notices) can need
        rewriting, relay every byte untouched. A text that reads a masked column anywhere, also
        only in a predicate, keeps its plan: its errors are masked with it. (A plan is never
        changed once made — plans are cached and shared — so this is worked out once.)"""
        if self.error is not None:
            return False
        if self.touches_masked or any(r.masks_anything for r in self.results):
            return True
        m = self.masking
        return m is not None and bool(m.detectors) and any(r.kind in ("rows", "copy") for r in self.results)

    @cached_property
    def shares_rewriters(self) -> bool:
        """`bind(0, fields)` returns the same rewriter for the same fields object every time (the
        first result's plan keeps it), so a caller may keep it: false for a COPY, whose rewriter
        holds a partial line, and for a text with no result planned."""
        return bool(self.results) and self.results[0].kind != "copy"

    def bind(self, index: int, fields: Sequence[Any], formats: Sequence[int] | None = None) -> Any:
        """The rewriter for the `index`-th result of the text (RowDescription fields, or [] at a
        CopyOutResponse); None to pass its rows untouched. Has `rewrite` and `copy_data`."""
        if index < len(self.results):
            r = self.results[index]
            if r.kind == "copy":
                return r.copy_rewriter(len(fields) if fields else None)
            return r.bind(fields, formats)
        # more results than statements we analysed: mask whatever could carry masked data
        assert self.masking is not None and self.catalog is not None
        return ResultPlan("none", (), self.masking, self.catalog).bind(fields, formats)


_BLIND = object()  # tags a plan cache key made of a constant-blind parse tree


def confirmed_by_server(actions: list[str | None], fields: Sequence[Field], catalog: Catalog,
                        masking: SubjectMasking) -> list[str | None]:
    """`actions` with the server's own word added: a RowDescription field that names a table column
    (table OID and attribute number) is masked as that column is, whatever the plan thought."""
    for i, f in enumerate(fields):
        if i < len(actions) and actions[i] is None and f.table_oid:
            rel = catalog.by_oid.get(f.table_oid)
            col = rel.column_at(f.attnum) if rel else None
            if rel is not None and col is not None:
                actions[i] = masking.column_strategy(rel, col)
    return actions


class SubjectMasking:
    """The merged MaskingRules for one caller on one connection."""

    def __init__(self, rules: Sequence[MaskingRule]) -> None:
        self.rules = tuple(rules)
        self.rule_names = tuple(f"{r.namespace}/{r.name}" for r in rules)
        cols: dict[tuple[str, str], dict[str, str]] = {}
        for r in rules:
            for c in r.columns:
                t = cols.setdefault((c.schema, c.table), {})
                t[c.column] = strongest(t[c.column], c.strategy) if c.column in t else c.strategy
        self.columns = cols
        self.masked_names = frozenset(c for t in cols.values() for c in t)
        self.has_columns = bool(cols)
        seen: dict[str, Detector] = {}
        for r in rules:
            for d in r.detectors:
                seen.setdefault(f"{d.name}\0{d.full.pattern}", d)
        self.detectors = DetectorSet(seen.values())
        self.derived = "deny" if any(r.derived == "deny" for r in rules) else "redact"
        self.whole_row = "deny" if any(r.whole_row == "deny" for r in rules) else "redact"
        self.allow_in_predicates = all(r.allow_in_predicates for r in rules)
        self.hash_key = next((r.hash_key for r in rules if r.hash_key), None)
        self._fns = {s: strategy_function(s, self.hash_key) for s in
                     ("redact", "partial", "email", "last4", "hash", "null", "derived")}
        # a view's output columns and the masked columns its own clauses read, together, by
        # (catalog version, schema, name): bounded, since every DDL makes a new catalog version
        self.view_cache: BoundedCache[Any, tuple[list[ln.OutCol], frozenset[str]]] = BoundedCache(1024)
        self._plans: BoundedCache[Any, StatementPlan] = BoundedCache(2048)

    @classmethod
    def merge(cls, rules: Sequence[MaskingRule]) -> SubjectMasking:
        return cls(rules)

    def strategy(self, name: str) -> Any:
        return self._fns[name]

    def column_strategy(self, rel: Relation, column: str) -> str | None:
        """The strategy for rel.column, also when a parent table (inheritance, partitions) has it,
        or a child: reading the parent returns the child's rows, and their values, too."""
        strat = self.columns.get((rel.schema, rel.name), {}).get(column)
        for kin in (*rel.parents, *rel.children):
            p = self.columns.get(kin, {}).get(column)
            if p is not None:
                strat = p if strat is None else strongest(strat, p)
        return strat

    # -- planning ------------------------------------------------------------------------------

    def plan(self, sql: str, catalog: Catalog, search_path: Sequence[str] = ("public",),
             session: MaskingSession | None = None, blind: str = "") -> StatementPlan:
        """Plan every statement of `sql`; a refusal is returned as `plan.error` (PolicyDenied, 42501).

        `blind`: the text's parse tree with literals blanked (pgwarden.policy Analysis.blind). A
        plan whose analysis read no literal's value is cached by it, so texts that differ only in
        literals (pgbench, ORMs with inlined values) share one plan."""
        try:
            return self._plan(sql, catalog, search_path, session, blind)
        except PolicyDenied as e:
            return StatementPlan((), error=e, masking=self, catalog=catalog)

    def _plan(self, sql: str, catalog: Catalog, search_path: Sequence[str],
              session: MaskingSession | None, blind: str = "") -> StatementPlan:
        path = tuple(search_path)
        if blind:  # first: texts that differ only in literals (pgbench, inlined values) hit here
            hit = self._plans.get((_BLIND, blind, catalog.version, path), touch=True)
            if hit is not None:
                return hit
        key = (sql, catalog.version, path)
        hit = self._plans.get(key, touch=True)
        if hit is not None:
            return hit
        reads_before = ln.LITERAL_READS.count
        try:
            stmts = parse_sql(sql)
        except ParseError as e:
            raise PolicyDenied(f"masking: the statement could not be parsed ({e})",
                               hint="Check the SQL syntax.") from e
        results = []
        ddl = False
        touches = False
        cacheable = True
        analyzer = ln.Analyzer(self, catalog, search_path)
        touched: set[str] = set()
        for raw in stmts:
            stmt = raw.stmt
            kind, outs, extra = analyzer.statement(stmt, session)
            if changes_schema(type(stmt).__name__) and not ddl:
                ddl = True
                # the statements after it in this text run against the schema it makes, which the
                # catalog snapshot does not show (a view redefined to read a masked column under a
                # clear name): they are planned as if no relation were known, every column masked
                touched |= analyzer.touched
                analyzer = ln.Analyzer(self, UNKNOWN, search_path)
            if isinstance(stmt, ln._SESSION_STMTS):
                cacheable = False
            if kind == "fetch":
                outs = session.cursors.get(extra["cursor"]) if session else None
                kind = "rows"
            elif kind == "execute":
                outs = session.prepared.get(extra["prepared"]) if session else None
                kind = "rows"
            if kind in ("rows", "copy") and outs is None:  # a cursor or statement we never saw
                outs = ln.spread(ln.Taint(ln.UNKNOWN, None, frozenset({"an unknown cursor or statement"})))
                if not self.has_columns:
                    outs = ln.spread(ln.CLEAR_T)
            if session is not None and "declare" in extra:
                session.cursors[extra["declare"]] = redeclared(session.cursors.get(extra["declare"]), extra["outs"])
            if session is not None and "prepare" in extra:
                session.prepared[extra["prepare"]] = redeclared(session.prepared.get(extra["prepare"]), extra["outs"])
            if isinstance(stmt, ast.ClosePortalStmt) and session is not None:
                if stmt.portalname is None:
                    session.cursors.clear()
                else:
                    session.cursors.pop(stmt.portalname, None)
            if isinstance(stmt, ast.DeallocateStmt) and session is not None:
                if stmt.name is None:
                    session.prepared.clear()
                else:
                    session.prepared.pop(stmt.name, None)
            cols = tuple(self.column_plan(i, o, analyzer) for i, o in enumerate(outs or ()))
            touches = touches or any(c.action is not None for c in cols) or bool(
                extra.get("outs") and any(o.taint.tainted for o in extra["outs"]))
            # EXECUTE / FETCH run a body analysed earlier, which may read masked columns anywhere
            touches = touches or (self.has_columns and kind_was_session(extra))
            made = tuple((k, extra[k], extra["outs"]) for k in ("declare", "prepare") if k in extra)
            results.append(ResultPlan(kind, cols, self, catalog, extra.get("options", {}), made))
        touched |= analyzer.touched
        touches = touches or (self.has_columns and bool(touched))
        sources = frozenset(touched) | frozenset(
            s for r in results for c in r.columns for s in c.source.split(", ") if s)
        by_shape = cacheable and bool(blind) and ln.LITERAL_READS.count == reads_before
        plan = StatementPlan(tuple(results), ddl, touches, None, self, catalog,
                             sources if touches else frozenset(), by_shape)
        if cacheable:
            self._plans.put(key, plan)
            if by_shape:
                self._plans.put((_BLIND, blind, catalog.version, key[2]), plan)
        return plan

    def column_plan(self, i: int, out: ln.OutCol, analyzer: ln.Analyzer) -> ln.ColumnPlan:
        t = out.taint
        src = ", ".join(sorted(t.sources))
        if t.kind == ln.CLEAR:
            return ln.ColumnPlan(None, out.spread)
        if t.kind == ln.DIRECT:
            return ln.ColumnPlan(t.strategy, out.spread, src, t.type_oid)
        policy = self.whole_row if t.kind == ln.WHOLEROW else self.derived
        if policy == "deny":
            what = "a whole row of" if t.kind == ln.WHOLEROW else "a value computed from"
            label = f"result column {i + 1}" + (f" ({out.name})" if out.name and out.name != "?" else "")
            raise analyzer.deny(f"{label} is {what} masked data, and this rule denies that", t)
        return ln.ColumnPlan("derived", out.spread, src)

    # -- errors --------------------------------------------------------------------------------

    def mask_error_fields(self, fields: Mapping[str, str], plan: StatementPlan | None = None,
                          catalog: Catalog | None = None) -> dict[str, str]:
        return _mask_error_fields(fields, self, plan, catalog)
