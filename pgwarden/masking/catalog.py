"""What the database holds: relations, their ordered columns and types, view definitions.

Lineage needs the catalog to expand `*`, to know which relation an unqualified name means, and
to see through views (a view column that is `customers.email` must be masked like the column).
The proxy reads it on a side connection with `load_catalog` — a *synchronous* pg8000 loader,
run in a worker thread (`await asyncio.to_thread(cache.refresh)`) so the event loop never
blocks — caches it in a `CatalogCache`, and refreshes it when a statement plan says it ran DDL
(`StatementPlan.ddl`) or when `CatalogCache.stale` says the timer expired.

View definitions are read with `search_path = pg_catalog`, so `pg_get_viewdef` qualifies every
relation outside pg_catalog (`public.customers`) and each view's text can be analysed the same
way as the agent's own statements, independently of the agent's search_path.

`Catalog.from_dicts` builds one from plain data for pure tests.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

# Types whose values are text on the wire in both formats (binary send of these is the text).
TEXT_TYPE_OIDS = frozenset({25, 1043, 1042, 19, 705})
JSON_OID = 114
JSONB_OID = 3802
XML_OID = 142
# Scalar types that cannot carry a masked text form and are not scanned by detectors.
NON_TEXT_SCALARS = frozenset({
    16, 17, 18, 20, 21, 23, 26, 28, 650, 700, 701, 790, 829, 869, 1082, 1083, 1114, 1184, 1186,
    1266, 1560, 1562, 1700, 2950, 3220, 5069,
})

_versions = itertools.count(1)


@dataclass(frozen=True)
class Relation:
    """A table, view, materialized view, foreign or partitioned table."""

    schema: str
    name: str
    kind: str = "r"  # pg_class.relkind: r, v, m, f, p
    columns: tuple[str, ...] = ()
    type_oids: tuple[int, ...] = ()
    attnums: tuple[int, ...] = ()
    oid: int = 0
    view_sql: str | None = None
    # ancestors (inheritance, partitioning): a rule on a parent also covers its children
    parents: tuple[tuple[str, str], ...] = ()
    # descendants: reading a parent returns its children's rows too, so a rule on a child also
    # covers the parent's column of that name (with_descendants fills it in)
    children: tuple[tuple[str, str], ...] = ()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def column_at(self, attnum: int) -> str | None:
        if self.attnums:
            try:
                return self.columns[self.attnums.index(attnum)]
            except ValueError:
                return None
        return self.columns[attnum - 1] if 0 < attnum <= len(self.columns) else None


# PostgreSQL's built-in set-returning functions (for catalogs built by hand; the loader reads them)
SET_RETURNING = frozenset({
    "generate_series", "generate_subscripts", "unnest", "regexp_matches", "regexp_split_to_table",
    "string_to_table", "json_array_elements", "json_array_elements_text", "jsonb_array_elements",
    "jsonb_array_elements_text", "json_each", "json_each_text", "jsonb_each", "jsonb_each_text",
    "json_object_keys", "jsonb_object_keys", "json_populate_recordset", "jsonb_populate_recordset",
    "json_to_recordset", "jsonb_to_recordset", "jsonb_path_query", "ts_debug", "ts_parse", "ts_stat",
    "ts_token_type", "pg_options_to_table", "aclexplode", "pg_get_keywords", "xpath_table",
})


@dataclass
class Catalog:
    """An immutable snapshot; `version` changes on every load so caches keyed on it expire."""

    relations: dict[tuple[str, str], Relation] = field(default_factory=dict)
    # builtin function names (pg_catalog, information_schema); None = treat unknown names as
    # builtin (only for hand-built test catalogs: the loader always fills it)
    builtin_functions: frozenset[str] | None = None
    # (schema, name) of functions outside pg_catalog: opaque to the analysis
    user_functions: frozenset[tuple[str, str]] = frozenset()
    text_type_oids: frozenset[int] = TEXT_TYPE_OIDS
    # names of functions that return a set (pg_proc.proretset, any overload); the loader adds
    # the server's own to the built-in list below
    set_returning_functions: frozenset[str] = field(default_factory=lambda: SET_RETURNING)
    version: int = field(default_factory=lambda: next(_versions))
    loaded_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.by_oid: dict[int, Relation] = {r.oid: r for r in self.relations.values() if r.oid}
        self.by_name: dict[str, list[Relation]] = {}
        for r in self.relations.values():
            self.by_name.setdefault(r.name, []).append(r)

    def get(self, schema: str, name: str) -> Relation | None:
        return self.relations.get((schema, name))

    def resolve(self, name: str, search_path: Iterable[str]) -> tuple[Relation | None, list[Relation]]:
        """(the relation search_path picks, every relation of that name in any schema)."""
        candidates = self.by_name.get(name, [])
        for schema in ("pg_catalog", *search_path):
            r = self.relations.get((schema, name))
            if r is not None:
                return r, candidates
        return None, candidates

    def is_text_type(self, oid: int) -> bool:
        return oid in self.text_type_oids

    def user_function(self, schema: str | None, name: str, search_path: Iterable[str]) -> bool:
        """True when the call may reach a function the analysis cannot see into."""
        if schema is not None and schema not in ("pg_catalog", "information_schema"):
            return True
        if schema is None and any((s, name) in self.user_functions for s in search_path):
            return True
        if schema is None and any(n == name for _, n in self.user_functions):
            return True  # search_path may have been changed by the session: assume the worst
        if self.builtin_functions is not None and name not in self.builtin_functions:
            return True
        return False

    def set_returning(self, schema: str | None, name: str) -> bool:
        """True when a call of `name` may return a number of rows that depends on its arguments."""
        return name in self.set_returning_functions

    def unknown_function(self, name: str) -> bool:
        """No function of that name existed when the catalog was read: it may return a set."""
        if self.builtin_functions is None or name in self.builtin_functions:
            return False
        return not any(n == name for _, n in self.user_functions)

    @classmethod
    def from_dicts(
        cls,
        tables: Mapping[str, Iterable[str | tuple[str, int]]],
        views: Mapping[str, str | tuple[str, Iterable[str]]] | None = None,
        *,
        builtin_functions: Iterable[str] | None = None,
        user_functions: Iterable[str] = (),
        parents: Mapping[str, Iterable[str]] | None = None,
        oids: Mapping[str, int] | None = None,
    ) -> Catalog:
        """Build from plain data: `{"public.customers": ["id", ("email", 25), ...]}`.

        Columns are names or (name, type oid), type 25 (text) by default. Views are SQL text, or
        (SQL, column names); without names the view's own output names are used.
        """
        rels: dict[tuple[str, str], Relation] = {}
        parents = parents or {}
        oids = oids or {}
        for qual, cols in tables.items():
            schema, name = qual.split(".")
            names, types = [], []
            for c in cols:
                n, t = (c, 25) if isinstance(c, str) else c
                names.append(n)
                types.append(t)
            rels[(schema, name)] = Relation(
                schema, name, "r", tuple(names), tuple(types), (), oids.get(qual, 0),
                parents=tuple(tuple(p.split(".")) for p in parents.get(qual, ())),  # type: ignore[misc]
            )
        for qual, v in (views or {}).items():
            schema, name = qual.split(".")
            sql, cols2 = (v, ()) if isinstance(v, str) else (v[0], tuple(v[1]))
            rels[(schema, name)] = Relation(schema, name, "v", tuple(cols2), (), (), oids.get(qual, 0), sql)
        ufs = frozenset(tuple(f.split(".")) for f in user_functions)
        return cls(
            relations=with_descendants(rels),
            builtin_functions=frozenset(builtin_functions) if builtin_functions is not None else None,
            user_functions=ufs,  # type: ignore[arg-type]
        )


_RELATIONS_SQL = """
SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text,
       CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
"""
_COLUMNS_SQL = """
SELECT a.attrelid::int8, a.attname::text, a.atttypid::int8, a.attnum::int4
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'f', 'p')
ORDER BY a.attrelid, a.attnum
"""
_INHERITS_SQL = "SELECT inhrelid::int8, inhparent::int8 FROM pg_inherits"
_FUNCTIONS_SQL = """
SELECT n.nspname::text, p.proname::text, bool_or(p.proretset)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
GROUP BY 1, 2
"""
_TEXT_TYPES_SQL = """
SELECT t.oid::int8 FROM pg_type t LEFT JOIN pg_type b ON b.oid = t.typbasetype
WHERE (t.typcategory = 'S' OR b.typcategory = 'S' OR t.typtype = 'e') AND t.oid <> 18
"""


def load_catalog(conn: Any) -> Catalog:
    """Read the catalog over a pg8000.native.Connection (blocking: run it in a thread).

    Changes the side connection's search_path to pg_catalog (see the module docstring); the
    connection should be used for nothing else.
    """
    conn.run("SELECT set_config('search_path', 'pg_catalog', false)")
    rel_rows = conn.run(_RELATIONS_SQL)
    col_rows = conn.run(_COLUMNS_SQL)
    inh_rows = conn.run(_INHERITS_SQL)
    fn_rows = conn.run(_FUNCTIONS_SQL)
    type_rows = conn.run(_TEXT_TYPES_SQL)

    cols: dict[int, list[tuple[str, int, int]]] = {}
    for relid, name, typ, num in col_rows:
        cols.setdefault(relid, []).append((name, typ, num))
    names = {oid: (schema, rel) for oid, schema, rel, _, _ in rel_rows}
    parents: dict[int, list[int]] = {}
    for child, parent in inh_rows:
        parents.setdefault(child, []).append(parent)

    def ancestors(oid: int) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        todo = list(parents.get(oid, ()))
        while todo:
            p = todo.pop()
            if p in names and names[p] not in out:
                out.append(names[p])
                todo.extend(parents.get(p, ()))
        return tuple(out)

    rels: dict[tuple[str, str], Relation] = {}
    for oid, schema, rel, kind, viewdef in rel_rows:
        c = cols.get(oid, [])
        rels[(schema, rel)] = Relation(
            schema=schema,
            name=rel,
            kind=kind,
            columns=tuple(x[0] for x in c),
            type_oids=tuple(x[1] for x in c),
            attnums=tuple(x[2] for x in c),
            oid=oid,
            view_sql=viewdef,
            parents=ancestors(oid),
        )
    builtin = frozenset(n for s, n, _ in fn_rows if s in ("pg_catalog", "information_schema"))
    user = frozenset((s, n) for s, n, _ in fn_rows if s not in ("pg_catalog", "information_schema"))
    srf = SET_RETURNING | frozenset(n for _, n, retset in fn_rows if retset)
    text_types = TEXT_TYPE_OIDS | frozenset(r[0] for r in type_rows)
    return Catalog(relations=with_descendants(rels), builtin_functions=builtin, user_functions=user,
                   text_type_oids=text_types, set_returning_functions=srf)


def with_descendants(rels: dict[tuple[str, str], Relation]) -> dict[tuple[str, str], Relation]:
    """`rels` with each relation's descendants (every relation that lists it among its
    ancestors) in `children`."""
    below: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for key, rel in rels.items():
        for parent in rel.parents:
            below.setdefault(parent, []).append(key)
    return {key: replace(rel, children=tuple(below[key])) if key in below else rel for key, rel in rels.items()}


# every relation unknown, so every column they give is masked: the catalog before the first load,
# and what a session plans against while a schema change of any session is not yet settled
UNKNOWN = Catalog(builtin_functions=frozenset())


class CatalogCache:
    """The proxy's cached catalog for one database, refreshed on DDL or after `max_age` seconds.

    `connect` opens a pg8000.native.Connection (the side connection). Call `refresh()` from a
    worker thread; readers keep using the previous snapshot until the new one is complete.
    """

    def __init__(self, connect: Callable[[], Any], max_age: float = 300.0) -> None:
        self._connect = connect
        self.max_age = max_age
        self._catalog: Catalog | None = None
        self._dirty = True
        self._lock = threading.Lock()
        self._empty = UNKNOWN
        # DDL marks, and the marks a completed read covers: the snapshot is out of date (`changed`)
        # from a mark until a read that started after it completes; `changes` moves with both
        self._marks = 0
        self._read_marks = 0
        self.changes = 0

    @property
    def catalog(self) -> Catalog | None:
        return self._catalog

    def current(self) -> Catalog:
        """The snapshot to plan with; before the first load an empty catalog, under which every
        relation is unknown and so every column is masked (fail closed, never blocks)."""
        c = self._catalog
        if c is None:
            c = self._empty
        return c

    @property
    def stale(self) -> bool:
        c = self._catalog
        return self._dirty or c is None or time.monotonic() - c.loaded_at > self.max_age

    @property
    def changed(self) -> bool:
        """DDL was seen after the read that made the snapshot began: a plan made with it now could
        miss what the schema change did, so plans wait for a read that began after the change
        (also while one is under way: it may have read the catalog before the change committed)."""
        return self._catalog is not None and self._read_marks != self._marks

    def mark_stale(self) -> None:
        """Called when a statement plan says DDL ran (`StatementPlan.ddl`)."""
        self._dirty = True
        self._marks += 1
        self.changes += 1

    def refresh(self) -> Catalog:
        with self._lock:
            self._dirty = False
            marks = self._marks  # what this read covers: a mark from now on needs another
            conn = self._connect()
            try:
                cat = load_catalog(conn)
            except BaseException:
                self._dirty = True
                raise
            finally:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing a broken side connection
                    pass
            self._catalog = cat
            self._read_marks = marks
            self.changes += 1
            return cat
