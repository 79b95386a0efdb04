"""The one registry of everything that has a name on the server session, as the server has it.

PostgreSQL changes its named objects only for what it *executes*: after an error the rest of a
multi-statement Query and the rest of an extended batch up to Sync are skipped, a Parse of a name
that exists fails (42P05), a DEALLOCATE or CLOSE that was skipped leaves the old object in place.
So every entry here changes only on the server's confirmation of that exact command:

| command                                   | confirmed by                          | on error of that command     |
|-------------------------------------------|---------------------------------------|------------------------------|
| Parse name                                | ParseComplete                         | unnamed: the old one is gone |
| Bind portal                               | BindComplete                          | unnamed: treated as gone     |
| Close S/P name                            | CloseComplete                         | nothing                      |
| Query (any text)                          | it runs at all: unnamed stmt + portal are dropped (exec_simple_query) | |
| PREPARE / DEALLOCATE / DECLARE / CLOSE / DISCARD ALL, in a Query | that statement's CommandComplete | nothing, and the rest is skipped |
| the same statements run by protocol Execute | that Execute's CommandComplete      | nothing                      |
| transaction end (ReadyForQuery 'I')       | non-holdable portals and cursors are gone                             | |

Skipped commands change nothing. Decisions are made against a *speculative* view: the confirmed
state plus the changes of the unit (one Query, or the extended messages up to Sync) being sent.
The relay never lets a unit be decided while an earlier unit's changes are still unconfirmed, so
the view is only ever ahead of the server by changes the server will skip together with every
later message of the same unit. Entries the server may have dropped silently (cursors of a
rolled-back savepoint, WITH HOLD cursors of an aborted transaction) are kept: a use of such a
name fails on the server, and the entry can only be replaced by a confirmed re-creation.

The registry is read by the policy (EXECUTE is decided as the prepared body), masking (FETCH and
protocol Execute use the plan captured when the cursor or portal was made), approvals (a review
of EXECUTE shows and binds the body) and audit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

# change kinds
# kinds of Change; Final literals are constants in the compiled code (see relay.py)
PUT_STATEMENT: Final = 0
DROP_STATEMENT: Final = 1
PUT_PORTAL: Final = 2
DROP_PORTAL: Final = 3
DISCARD: Final = 4

Change = tuple[int, Any, Any]  # (kind, name — None: all named objects, entry)


class PreparedEntry:
    """A prepared statement: protocol Parse (`origin` "parse") or SQL PREPARE ("prepare")."""

    # a plain class, not a dataclass: made per statement (see pgwarden/compiled.py)
    __slots__ = ("name", "sql", "origin", "policy_body", "mask_outs", "results", "context", "max_rows", "guard",
                 "reviewed", "fields", "run_changes", "rebind", "planned_with", "decided_in", "formatted")

    def __init__(self, name: str, sql: str, origin: str, policy_body: Any = None, mask_outs: Any = None,
                 results: Any = None, context: Any = None, max_rows: int | None = None, guard: Any = None,
                 reviewed: Any = None, fields: tuple[Any, ...] | None = None, run_changes: tuple[Change, ...] = (),
                 rebind: bool = False, planned_with: tuple[Any, Any] | None = None, decided_in: int = 0) -> None:
        self.name = name
        self.sql = sql  # what a reviewer and the audit are shown for it
        self.origin = origin
        self.policy_body = policy_body  # pgwarden.policy StatementAnalysis: SQL EXECUTE is decided as this
        self.mask_outs = mask_outs  # masking lineage of its result; None: unknown (fully masked)
        self.results = results  # the relay's ResultPolicy for its rows (protocol)
        self.context = context  # the gate's StatementContext of the Parse
        self.max_rows = max_rows
        self.guard = guard  # the relay's AffectedGuard: a run changing more rows is undone
        self.reviewed = reviewed  # (decision, results): every Bind needs its own approval
        self.fields = fields  # RowDescription from a Describe of the statement
        # what running it does to the registry (a Parse of "DECLARE c …"): staged at Execute
        self.run_changes = run_changes
        # it names a statement or cursor looked up when it runs (EXECUTE, FETCH): decided at each Bind
        self.rebind = rebind
        # (masking, catalog snapshot) `mask_outs` / `results` were planned with (None: no masking):
        # planned again (Parse) or taken as unknown (SQL PREPARE) under another masking or catalog,
        # as the server plans it again for the schema as it is now
        self.planned_with = planned_with
        self.decided_in = decided_in  # the gate's configuration generation it was decided under (Parse)
        # (fields, a Bind's result formats, the fields with those formats): the last Bind's, kept for
        # the next (a driver asks the same formats at every run); the relay's, see relay._formatted
        self.formatted: tuple[object, tuple[int, ...], tuple[Any, ...]] | None = None


class PortalEntry:
    """A portal: protocol Bind (`origin` "bind") or SQL DECLARE ("declare"); one namespace."""

    # a plain class, not a dataclass: made per statement (see pgwarden/compiled.py)
    __slots__ = ("name", "origin", "statement", "results", "context", "max_rows", "guard", "formats", "fields",
                 "holdable", "mask_outs", "sql", "pins")

    def __init__(self, name: str, origin: str, statement: PreparedEntry | None = None, results: Any = None,
                 context: Any = None, max_rows: int | None = None, guard: Any = None, formats: tuple[int, ...] = (),
                 fields: tuple[Any, ...] | None = None, holdable: bool = False, mask_outs: Any = None, sql: str = "",
                 pins: tuple[tuple[str, str, Any], ...] = ()) -> None:
        self.name = name
        self.origin = origin
        self.statement = statement  # the statement it was bound from, as it was then
        self.results = results
        self.context = context
        self.max_rows = max_rows
        self.guard = guard  # the relay's AffectedGuard of its statement or its approval
        self.formats = formats
        self.fields = fields
        self.holdable = holdable
        self.mask_outs = mask_outs  # DECLARE: masking lineage of the cursor's rows
        self.sql = sql
        self.pins = pins  # see Verdict.pins (relay.py)


def apply(statements: dict[str, PreparedEntry], portals: dict[str, PortalEntry], changes: Iterable[Change]) -> bool:
    """Apply `changes` to one pair of tables, in order; True when anything changed."""
    changed = False
    for kind, name, entry in changes:
        if kind == PUT_STATEMENT:
            statements[name] = entry
            changed = True
        elif kind == DROP_STATEMENT:
            if name is None:  # DEALLOCATE ALL: every named statement (the unnamed one stays)
                unnamed = statements.get("")
                changed = changed or len(statements) > (unnamed is not None)
                statements.clear()
                if unnamed is not None:
                    statements[""] = unnamed
            else:
                changed = statements.pop(name, None) is not None or changed
        elif kind == PUT_PORTAL:
            portals[name] = entry
            changed = True
        elif kind == DROP_PORTAL:
            if name is None:  # CLOSE ALL
                changed = changed or bool(portals)
                portals.clear()
            else:
                changed = portals.pop(name, None) is not None or changed
        elif kind == DISCARD:  # DISCARD ALL
            changed = changed or bool(statements) or bool(portals)
            statements.clear()
            portals.clear()
    return changed


@dataclass
class SessionNames:
    """Confirmed and speculative tables of prepared statements and portals of one session."""

    statements: dict[str, PreparedEntry] = field(default_factory=dict)
    portals: dict[str, PortalEntry] = field(default_factory=dict)
    spec_statements: dict[str, PreparedEntry] = field(default_factory=dict)
    spec_portals: dict[str, PortalEntry] = field(default_factory=dict)
    # bumped whenever the speculative view changes: the gate re-derives its policy and masking
    # views of it then
    version: int = 0
    _spec_differs: bool = False
    # schema changes (DDL) of this session, watched from when the gate lets one through or the
    # relay sends one (`watch_schema`, then `on_unsettled`) until the first ReadyForQuery 'I' with
    # none in flight (the relay counts those sent and not yet answered or skipped): the change is
    # committed or rolled back then, and `on_settled` runs
    ddl_watch: bool = False
    ddl_in_flight: int = 0
    on_unsettled: Callable[[], None] | None = None
    on_settled: Callable[[], None] | None = None

    # -- deciding (speculative) ----------------------------------------------------------------
    def statement(self, name: str) -> PreparedEntry | None:
        return self.spec_statements.get(name)

    def portal(self, name: str) -> PortalEntry | None:
        return self.spec_portals.get(name)

    def stage(self, changes: Sequence[Change]) -> None:
        """Changes a command being sent will make if the server runs it."""
        if changes and apply(self.spec_statements, self.spec_portals, changes):
            self._spec_differs = True
            self.version += 1

    def begin_unit(self) -> None:
        """A new unit is about to be decided and no earlier unit has unconfirmed changes: the
        view becomes the confirmed state."""
        if self._spec_differs:
            self.spec_statements = dict(self.statements)
            self.spec_portals = dict(self.portals)
            self._spec_differs = False
            self.version += 1

    # -- the server's word (confirmed) ---------------------------------------------------------
    def confirm(self, changes: Sequence[Change]) -> None:
        if changes and apply(self.statements, self.portals, changes):
            self._spec_differs = True

    def transaction_ended(self) -> None:
        """ReadyForQuery 'I': every portal that is not a WITH HOLD cursor is gone."""
        gone = [n for n, p in self.portals.items() if not p.holdable]
        if gone:
            for n in gone:
                del self.portals[n]
            self._spec_differs = True
        if not self.ddl_in_flight:
            self.settle_schema()

    def reset(self) -> None:
        """The server session was replaced: nothing exists any more."""
        self.statements.clear()
        self.portals.clear()
        self._spec_differs = True
        self.begin_unit()
        self.ddl_in_flight = 0
        self.settle_schema()  # its transaction went with it

    def watch_schema(self) -> None:
        """A schema change is let through or sent: watched until its transaction ends."""
        if not self.ddl_watch:
            self.ddl_watch = True
            if self.on_unsettled is not None:
                self.on_unsettled()

    def schema_change_sent(self) -> None:
        """The relay sent a statement with a schema change: in flight until answered or skipped."""
        self.ddl_in_flight += 1
        self.watch_schema()

    def settle_schema(self) -> None:
        """The watched change is committed or rolled back (or the session is gone)."""
        if self.ddl_watch:
            self.ddl_watch = False
            if self.on_settled is not None:
                self.on_settled()
