"""Per-statement enforcement: policy decision, masking plan, approval and the audit record.

One `SessionGate` per client session implements the relay's Gate and Observer. For every
statement it (1) asks the policy engine, (2) plans masking of its results, (3) for `review`
asks a human through the approval backend, and (4) writes the audit record — durably, before
the relay forwards anything. Any failure on this path refuses the statement (fail closed).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

from pgwarden.audit import records
from pgwarden.errors import (
    AgentError,
    ApprovalDenied,
    ApprovalExpired,
    ApprovalRequired,
    AuditUnavailable,
    LockedOut,
    PolicyDenied,
    RateLimited,
    StatementLimit,
)
from pgwarden.masking.catalog import UNKNOWN, Catalog
from pgwarden.masking.subject import changes_schema
from pgwarden.policy import analyze
from pgwarden.policy.front import filed
from pgwarden.proxy import messages as m
from pgwarden.proxy.analysis_budget import Analysed, AnalysisOffload
from pgwarden.proxy.circuit import CircuitBreaker
from pgwarden.proxy.relay import BARRIER, GUARD_PREFIX, AffectedGuard, Verdict, stricter
from pgwarden.proxy.session import PortalEntry, PreparedEntry, SessionNames
from pgwarden.proxy.statements import rebinds, shown_sql, statement_changes
from pgwarden.subjects import Identity, Workload
from pgwarden.times import iso

if TYPE_CHECKING:  # the composition root's parts, built by hooks.py (imported there, not here)
    from pgwarden.approvals.model import ApprovalBackend
    from pgwarden.audit.config import AuditConfig, RecordingConfig
    from pgwarden.audit.log import AuditLog
    from pgwarden.audit.recording import SessionRecorder
    from pgwarden.identity.authenticator import TokenAuthenticator
    from pgwarden.identity.backoff import FailureBackoff
    from pgwarden.identity.config import IdentityConfig
    from pgwarden.masking.catalog import CatalogCache
    from pgwarden.masking.ruleset import MaskingSet
    from pgwarden.policy.policyset import PolicySet
    from pgwarden.proxy.config import ProxyConfig
    from pgwarden.proxy.sessioninfo import SessionInfo

log = logging.getLogger("pgwarden.proxy.gate")


class StatementContext:
    """What the relay hands back with a statement's outcome."""

    # a plain class, not a dataclass: made per statement (see pgwarden/compiled.py)
    __slots__ = ("id", "sql", "started", "decision", "prepared", "approval_id", "approver", "ticket",
                 "masked_columns", "ddl", "params")

    def __init__(self, id: str, sql: str, started: float, decision: Any = None, prepared: bool = False,
                 approval_id: str = "", approver: str = "", ticket: Any = None, masked_columns: tuple[str, ...] = (),
                 ddl: bool = False, params: tuple[str | None, ...] | None = None) -> None:
        self.id = id
        self.sql = sql
        self.started = started
        self.decision = decision
        self.prepared = prepared
        self.approval_id = approval_id
        self.approver = approver
        self.ticket = ticket  # the approval this statement runs under, marked executed when it completes
        self.masked_columns = masked_columns
        self.ddl = ddl
        self.params = params  # Bind values, for statements approved per Bind

    def run(self, started: float, params: tuple[str | None, ...]) -> StatementContext:
        """One run (Bind) of this prepared statement: the same statement id, decision and text,
        its own start and values (an approval's ticket stays with the run it was granted for)."""
        return StatementContext(self.id, self.sql, started, self.decision, True, masked_columns=self.masked_columns,
                                ddl=self.ddl, params=params)


class _Facts:
    """What the check reads of one analysis and its decision, read once per pair of objects (and
    of its masking plan, once per plan: `plan_facts`). None of them changes once made (the
    analysis and the decision are frozen; plans are cached and shared, never changed) and every
    statement of a shape gets the same ones (the front's cache and the gate's `_decided` /
    `_planned` memos), and each read of an interpreted object's attribute from here is a
    dictionary lookup: about twenty per statement of a known shape before this."""

    __slots__ = ("analysis", "decision", "blind", "statements", "session_dependent", "reserved",
                 "names_change", "schema_change", "action", "enforce", "max_rows", "max_affected_rows",
                 "plan", "plan_error", "masks_anything", "plan_ddl")

    def __init__(self, analysis: Any, decision: Any) -> None:
        self.analysis = analysis
        self.decision = decision
        self.blind: str = analysis.blind
        self.statements: tuple[Any, ...] = analysis.statements
        self.session_dependent: bool = analysis.session_dependent
        # names as the parser read them (U& escapes decoded; unquoted ones folded): a quoted
        # name in other case is another name, never the proxy's
        self.reserved = GUARD_PREFIX in self.blind
        # the planner changes the session it is given only for texts that make or drop names
        self.names_change = any(st.effects or st.cursors for st in self.statements)
        self.schema_change = any(changes_schema(st.kind) for st in self.statements)
        self.action: str = decision.action if decision is not None else ""
        self.enforce: bool = decision.enforce if decision is not None else False
        limits = decision.limits if decision is not None else None
        self.max_rows: int | None = limits.max_rows if limits is not None else None
        self.max_affected_rows: int | None = limits.max_affected_rows if limits is not None else None
        self.plan: Any = None
        self.plan_error: Any = None
        self.masks_anything = False
        self.plan_ddl = False

    def plan_facts(self, plan: Any) -> None:
        """Read `plan`'s answers, unless they are this plan's already."""
        if plan is not self.plan:
            self.plan = plan
            self.plan_error = plan.error
            self.masks_anything = bool(plan.masks_anything)
            self.plan_ddl = bool(plan.ddl)


@dataclass
class Runtime:
    """Everything built once per proxy from the configuration documents (see hooks.py)."""

    connection: str
    search_path: tuple[str, ...]
    policies: PolicySet | None = None  # None: ProxyConfig.defaultAction decides
    masking: MaskingSet | None = None
    catalog: CatalogCache | None = None  # set whenever masking is
    audit: AuditLog | None = None
    recorder_factory: Callable[[SessionInfo], SessionRecorder | None] | None = None
    approvals: ApprovalBackend | None = None
    token_auth: TokenAuthenticator | None = None
    backoff: FailureBackoff | None = None
    workload: Workload = field(default_factory=Workload)
    audit_config: AuditConfig | None = None
    recording_config: RecordingConfig | None = None
    approvals_config: Mapping[str, Any] | None = None  # ProxyConfig spec.approvals, as written
    identity_config: IdentityConfig | None = None
    # bumped by a hot reload: sessions re-resolve their policy and masking at the next statement
    generation: int = 0
    # sessions with a schema change (DDL) not yet committed or rolled back: while any has one,
    # every session plans masking as if no relation were known (the catalog cannot show it)
    schema_unsettled: int = 0
    offload: AnalysisOffload | None = None  # analysis of long statements off the event loop
    breaker: CircuitBreaker | None = None  # limits.maxDenials / maxStatementsPerMinute (proxy/circuit.py)
    # background work (approval bookkeeping) that must finish before the audit log closes
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # how to reach the database for approval previews (a connection of their own): the ProxyConfig
    proxy_config: ProxyConfig | None = None

    def upstream_settings(self, identity: Identity) -> dict[str, str]:
        """Session settings pinned at login: the policy's statement timeout for this caller."""
        if self.policies is None:
            return {}
        timeout = self.policies.for_identity(identity, self.connection).limits.statement_timeout
        return {"statement_timeout": str(int(timeout * 1000))} if timeout else {}

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def bind_params(bind: m.BindMsg) -> tuple[str | None, ...]:
    """Parameter values as an approval shows and binds them: text as text, binary as hex."""
    formats = bind.param_formats
    out: list[str | None] = []
    for i, value in enumerate(bind.params):
        fmt = formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)
        if value is None:
            out.append(None)
        elif fmt == 0:
            out.append(value.decode("utf-8", "replace"))
        else:
            out.append("\\x" + value.hex())
    return tuple(out)


# what a Bind's record adds (records are serialized, never changed: one dict serves them all)
_BIND_PHASE: Final = {"phase": "bind"}
_DML_KINDS = frozenset(("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"))
_DML_KEYS = tuple(f'"{k}":{{' for k in sorted(_DML_KINDS))
_UNCOUNTED_KEYS = ('"TruncateStmt":{', '"is_from":true')


def _dml_nodes(blind: str) -> int:
    """INSERT / UPDATE / DELETE / MERGE nodes in a blinded parse tree (literals are blanked, so
    only a name spelled like a node could add one: that refuses more, never less)."""
    return sum(blind.count(k) for k in _DML_KEYS)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _with(verdict: Verdict, **fields: Any) -> Verdict:
    """`verdict` carrying the name changes (or Parse entry) of its statement, also once a held
    statement resolves — unless it resolves to a refusal, which makes no names."""
    if verdict.wait is None:
        if verdict.error is None:
            for k, v in fields.items():
                setattr(verdict, k, v)
        return verdict

    async def resolved(wait: Any) -> Verdict:
        final: Verdict = await wait
        if final.error is None:
            for k, v in fields.items():
                setattr(final, k, v)
        return final

    return Verdict(wait=resolved(verdict.wait), context=verdict.context)


def _unwritten(e: Exception, verdict: Verdict) -> Verdict:
    """The refusal when a statement's audit record could not be written: nothing is forwarded."""
    if isinstance(e, AgentError):  # AuditUnavailable (PW004) from the log itself
        return Verdict(error=e, context=verdict.context)
    log.exception("audit write failed")  # any sink failure closes the gate
    return Verdict(
        error=AuditUnavailable(f"the audit record could not be written ({type(e).__name__}); nothing was forwarded"),
        context=verdict.context,
    )


_refreshing: set[int] = set()


def refresh_catalog(catalog: Any) -> None:
    """Re-read the catalog on a worker thread; plans use the previous one meanwhile (an unknown
    relation is fully masked until then, so a stale catalog never passes a value in clear)."""
    key = id(catalog)
    if key in _refreshing:
        return
    _refreshing.add(key)

    def run() -> None:
        try:
            catalog.refresh()
        except Exception:
            log.exception("catalog refresh failed; masking keeps the previous catalog")
        finally:
            _refreshing.discard(key)

    asyncio.get_running_loop().run_in_executor(None, run)


_reloading: dict[int, asyncio.Future[Any]] = {}
RELOAD_TIMEOUT = 10.0  # seconds a statement waits for the catalog after a schema change


async def reload_catalog(catalog: Any) -> None:
    """Read the catalog again now (on a worker thread) and wait for it: one read shared by every
    statement waiting for it. Raises what the read raised, or TimeoutError."""
    key = id(catalog)
    fut = _reloading.get(key)
    if fut is None or fut.done():
        fut = _reloading[key] = asyncio.get_running_loop().run_in_executor(None, catalog.refresh)
    await asyncio.wait_for(asyncio.shield(fut), RELOAD_TIMEOUT)


class SessionGate:
    def __init__(self, rt: Runtime, info: Any, notify_client: Callable[[bytes], None] | None = None) -> None:
        from pgwarden.masking import MaskingSession
        from pgwarden.policy import SessionState

        self.rt = rt
        self.info = info
        self.notify_client = notify_client
        # views of the session registry for the policy (EXECUTE bodies) and masking (cursors and
        # prepared statements), re-derived whenever the registry's speculative view changes
        self.state = SessionState(search_path=rt.search_path)
        self.msession = MaskingSession()
        self.names = SessionNames()
        self.attach(self.names)  # its own registry until the relay attaches its one: changes count in either
        self._views_version = 0
        self._resolve()
        self.ainfo: records.SessionInfo = info.audit
        self.recorder = rt.recorder_factory(info) if rt.recorder_factory is not None else None
        self._ids = itertools.count(1)
        self.statements = 0
        self._formats: list[int] = []
        # the last result shape: (fields, names, type OIDs, formats)
        self._shape: tuple[tuple[m.Field, ...], tuple[str, ...], tuple[int, ...], list[int]] | None = None
        self._last_shown: tuple[Any, tuple[str, str, dict[str, Any]]] | None = None
        # the last (analysis, policy, decision) of a text that depends on no session state: the
        # texts of one shape share the analysis object, and the engine's decision for it with it
        self._decided: tuple[Any, Any, Any] | None = None
        # the last masking plan filed by shape, with the (blind tree, catalog snapshot, masking,
        # search_path) it was planned under
        self._planned: tuple[str, Any, Any, tuple[str, ...], Any] | None = None
        self._facts: _Facts | None = None  # the last statement's, see _Facts
        self._snap: Catalog | None = None  # the catalog snapshot, as of the cache's `changes`
        self._snap_changes = -1
        self._views_catalog: Catalog | None = None

    @property
    def catalog(self) -> CatalogCache:
        """The relations masking plans against: hooks.py builds it whenever a MaskingRule applies."""
        if self.rt.catalog is None:  # a wiring error: refuse rather than plan against nothing
            raise PolicyDenied("pgwarden has masking rules but no catalog to plan them against",
                               hint="Report this: the proxy's configuration was not loaded completely.")
        return self.rt.catalog

    def attach(self, names: SessionNames) -> None:
        """The relay's registry of the server session's names: the one copy, read here."""
        self.names = names
        names.on_unsettled = self._schema_unsettled
        names.on_settled = self._schema_settled
        self._views_version = -1

    # -- schema changes (the registry says when one starts and when its transaction ends) ----------
    def _schema_unsettled(self) -> None:
        """Until this session's change is settled, every session plans against UNKNOWN."""
        self.rt.schema_unsettled += 1

    def _schema_settled(self) -> None:
        self.rt.schema_unsettled -= 1
        if self.rt.catalog is not None:
            self.rt.catalog.mark_stale()  # plans wait for the catalog as the change left it

    def _snapshot(self) -> Catalog | None:
        """The catalog to plan masking with now; None: the schema changed since it was read, so
        a plan must wait for the next read (`_after_reload`). Cheap when nothing changed (every
        Bind of a prepared statement asks)."""
        if self.rt.schema_unsettled:
            return UNKNOWN
        cache = self.catalog
        if cache.changes == self._snap_changes and self._snap is not None:
            return self._snap
        if cache.changed:
            return None
        self._snap, self._snap_changes = cache.current(), cache.changes
        return self._snap

    async def _after_reload(self, sql: str, prepared: bool) -> Verdict:
        """Wait for the catalog to be read again after a schema change, then have the held message
        decided again (BARRIER); refused (fail closed) if it cannot be read."""
        try:
            await reload_catalog(self.catalog)
        except Exception as e:  # the side connection failing must not let a stale plan through
            log.warning("catalog reload after a schema change failed: %s", e)
            ctx = StatementContext(id=str(next(self._ids)), sql=sql, started=time.time(), prepared=prepared)
            verdict = self._refuse(ctx, PolicyDenied(
                f"pgwarden cannot mask this statement: the schema changed and the catalog could not be read again "
                f"({type(e).__name__})",
                hint="Retry in a moment; if this persists, the proxy cannot reach the database catalog (see its log).",
            ))
            return await verdict.wait if verdict.wait is not None else verdict
        return BARRIER

    def _redecided(self, statement: PreparedEntry) -> Verdict | None:
        """A statement Parsed under another configuration (a reload since), decided again by the
        policy as it is now: refused if it now denies it, reviewed per Bind if it now asks for
        review (PostgreSQL checks privileges at every run of a prepared statement too)."""
        statement.decided_in = self.generation
        decision = None
        guard = None
        state = self.state
        if statement.name in state.prepared:
            # its own name, registered since its Parse, is no conflict for deciding that Parse again
            # ("already prepared": every statement but the newest was refused after a reload)
            state = replace(state, prepared={k: v for k, v in state.prepared.items() if k != statement.name})
        try:
            if self.policy is not None:
                decision = self.policy.decide(statement.sql, state, prepare_as=statement.name)
            analysis = analyze(statement.sql, self.rt.search_path, self.state.server_version)
            guard = None if rebinds(analysis) else self._limit_guard(decision, analysis)
        except AgentError as e:
            err: AgentError = e
        except Exception as e:  # the engine failing must never let a statement through
            log.exception("policy engine failed")
            err = PolicyDenied(f"pgwarden could not decide this statement ({type(e).__name__})")
        else:
            if decision is None or decision.action != "deny" or not decision.enforce:
                statement.guard = guard
                statement.max_rows = decision.limits.max_rows if decision is not None else None
                review = decision is not None and decision.action == "review" and decision.enforce
                statement.reviewed = (decision, statement.results) if review else None
                if isinstance(statement.context, StatementContext):
                    statement.context.decision = decision
                return None
            err = decision.as_error()
        statement.decided_in = -1  # refused: decided again at its next Bind
        ctx = StatementContext(id=str(next(self._ids)), sql=statement.sql, started=time.time(), prepared=True,
                               decision=decision)
        return self._refuse(ctx, err)

    def _replanned(self, statement: PreparedEntry, snapshot: Catalog) -> Verdict | None:
        """A statement Parsed under another masking or catalog, planned again for them as they are
        now (PostgreSQL plans it again for the schema as it is too); a refusal if it now must be."""
        assert self.masking is not None
        self._sync_views(snapshot)
        plan = self.masking.plan(statement.sql, snapshot, self.rt.search_path, session=self._scratch_session())
        if plan.error is not None:
            ctx = StatementContext(id=str(next(self._ids)), sql=statement.sql, started=time.time(), prepared=True)
            return self._refuse(ctx, plan.error)
        results = plan if plan.masks_anything else None
        statement.results = results
        if statement.reviewed is not None:
            statement.reviewed = (statement.reviewed[0], results)
        statement.planned_with = (self.masking, snapshot)
        return None

    def _resolve(self) -> None:
        """This caller's policy and masking under the runtime's current configuration."""
        rt = self.rt
        self.generation = rt.generation
        # None: no AccessPolicy for this connection and defaultAction allow (development)
        self.policy = rt.policies.for_identity(self.info.identity, rt.connection) if rt.policies is not None else None
        self.masking = rt.masking.for_identity(self.info.identity, rt.connection) if rt.masking is not None else None
        detectors = self.masking.detectors if self.masking is not None else None
        # the prefilter runs compiled; a candidate goes to the detectors
        self._scrub = records.PrefilteredText(detectors.scrub, detectors.prefilter_text) if detectors else None

    def _sync_views(self, snapshot: Catalog | None = None) -> None:
        """`snapshot`: the catalog masking plans with now. A SQL-prepared statement whose result
        lineage was worked out with another one is left out of the masking view (its rows are
        fully masked): the server plans it again for the schema as it is now."""
        n = self.names
        if self._views_version == n.version and self._views_catalog is snapshot:
            return
        self._views_version = n.version
        self._views_catalog = snapshot
        stmts, portals = n.spec_statements, n.spec_portals
        self.state.prepared = {k: e.policy_body for k, e in stmts.items() if k and e.policy_body is not None}
        masking = self.masking
        self.msession.prepared = {k: e.mask_outs for k, e in stmts.items() if k and e.mask_outs is not None
                                  and (pw := e.planned_with) is not None and pw[0] is masking and pw[1] is snapshot}
        self.msession.cursors = {k: p.mask_outs for k, p in portals.items()
                                 if p.origin == "declare" and p.mask_outs is not None}

    # -- Gate -----------------------------------------------------------------------------------
    def query(self, sql: str, analysed: Analysed | None = None) -> Verdict | None:
        return self._check(sql, None, analysed)

    def parse(self, name: str, sql: str, analysed: Analysed | None = None) -> Verdict | None:
        return self._check(sql, name, analysed)

    def refuse_unread(self, head: bytes, size: int, err: AgentError) -> Verdict:
        """A statement text over the size limit, refused unread: audited with its first bytes."""
        sql = head.decode("utf-8", "replace") + f" …[refused unread: {size:,} bytes in all]"
        return self._refuse(StatementContext(id=str(next(self._ids)), sql=sql, started=time.time()), err)

    def bind(self, bind: m.BindMsg, statement: PreparedEntry | None) -> Verdict | None:
        """A statement that needs review is approved per Bind: the approval covers these
        parameter values, once — never the prepared statement for any values it may get later."""
        if statement is None or statement.origin != "parse":
            # PostgreSQL lets a Bind name a statement made by SQL PREPARE (one namespace): its
            # body was not decided for this route here, so it does not run.
            return Verdict(error=PolicyDenied(
                f"pgwarden refuses to bind prepared statement {bind.statement!r}: it was not prepared "
                "through the extended protocol on this connection",
                hint="Run SQL-prepared statements with EXECUTE, or Parse the statement before binding it.",
            ))
        if self.generation != self.rt.generation:
            self._resolve()  # a reload: this session's policy and masking as they are now
        if statement.decided_in != self.generation and not statement.rebind:
            refused = self._redecided(statement)
            if refused is not None:
                return refused
        if self.masking is not None and not statement.rebind:
            snapshot = self._snapshot()
            if snapshot is None:  # the schema changed: this Bind waits for the catalog
                return Verdict(wait=self._after_reload(statement.sql, True))
            pw = statement.planned_with
            if pw is None or pw[0] is not self.masking or pw[1] is not snapshot:
                refused = self._replanned(statement, snapshot)
                if refused is not None:
                    return refused
        if not statement.rebind and (limited := self._rate_limited()) is not None:
            return Verdict(error=limited)  # every run of a prepared statement counts towards the rate
        if statement.rebind:  # EXECUTE / FETCH by name: decided as the name is now, with these values
            if self.rt.offload is not None and len(statement.sql) > self.rt.offload.above_bytes:
                # deciding it again at every Bind would analyse a long text on the event loop
                return Verdict(error=StatementLimit(
                    f"pgwarden refuses to bind a {len(statement.sql):,}-character statement that names a prepared "
                    "statement or cursor: it is decided again at every Bind, and texts this long are analysed "
                    "only off the event loop",
                    hint="Send it as a simple query, or shorten it.",
                ))
            return self._check(statement.sql, None, bind=bind)
        if isinstance(statement.context, StatementContext) and statement.context.ddl:
            self.names.watch_schema()  # a prepared schema change runs again: settled after this run
        if statement.reviewed is None:
            parsed = statement.context
            audit, recorder = self.rt.audit, self.recorder
            if (audit is None and recorder is None) or not isinstance(parsed, StatementContext):
                return None
            params = bind_params(bind)
            run = parsed.run(time.time(), params)  # its outcome is timed from this Bind, not the Parse
            if recorder is not None:  # each run with its values (the Parse recorded no run, _note)
                recorder.statement(run.id, run.sql, params)
            if audit is None:
                return Verdict(context=run)
            # every execution's parameter values go into the audit trail (detector-scrubbed) first
            record = records.statement_record(
                self.ainfo, run.id, run.sql, decision="allow", protocol="extended",
                params=params, mask_text=self._scrub, extra=_BIND_PHASE,
            )
            return self._written(record, Verdict(context=run))
        decision, results = statement.reviewed
        ctx = StatementContext(id=str(next(self._ids)), sql=statement.sql, started=time.time(), prepared=True,
                               decision=decision, params=bind_params(bind))
        return Verdict(wait=self._review(ctx, decision, results, params=ctx.params or (), bind=bind,
                                         guard=statement.guard), context=ctx)

    def execute(self, name: str, portal: PortalEntry | None) -> Verdict | None:
        """A protocol Execute of a SQL cursor runs with the masking plan of its DECLARE; a portal
        the proxy does not know (never bound or declared through it) does not run."""
        ctx = StatementContext(id=str(next(self._ids)), sql=f"-- protocol Execute of portal {name!r}",
                               started=time.time(), prepared=True)
        if portal is None or portal.origin != "declare":
            return self._refuse(ctx, PolicyDenied(
                f"pgwarden refuses to execute portal {name!r}: no Bind or DECLARE through pgwarden on this "
                "connection made it, so its statement was never decided",
                hint="Bind a statement (or DECLARE the cursor) on this connection before executing it.",
            ))
        ctx.sql = f"FETCH FORWARD ALL FROM {_quote_ident(name)} -- protocol Execute of cursor, declared as: {portal.sql}"
        results = None
        if self.masking is not None:
            snapshot = self._snapshot() or UNKNOWN  # the schema changed since the catalog was read: fail closed
            self._sync_views(snapshot)
            plan = self.masking.plan(f"FETCH FORWARD ALL FROM {_quote_ident(name)}", snapshot,
                                     self.rt.search_path, session=self._scratch_session())
            if plan.error is not None:
                return self._refuse(ctx, plan.error)
            results = plan if plan.masks_anything else None
        return self._audited(ctx, Verdict(results=results, context=ctx, max_rows=portal.max_rows), "allow")

    def _scratch_session(self) -> Any:
        """The masking view for planning one text: the planner may change it for later statements
        of the same text; the session's own view changes only through the registry."""
        from pgwarden.masking import MaskingSession

        return MaskingSession(dict(self.msession.cursors), dict(self.msession.prepared))

    def _check(self, sql: str, prepared_name: str | None, analysed: Analysed | None = None,
               bind: m.BindMsg | None = None) -> Verdict:
        """Decide `sql`: a Query text, a Parse (`prepared_name`), or a Parse being bound again
        (`bind`: its text names a statement or cursor looked up when it runs). `analysed`: the
        policy decision and masking plan of a long text, made off the event loop."""
        if self.generation != self.rt.generation:
            self._resolve()
        snapshot = self._snapshot() if self.masking is not None else None
        if snapshot is None and self.masking is not None:
            return Verdict(wait=self._after_reload(sql, prepared_name is not None or bind is not None))
        if snapshot is not None and not self.rt.schema_unsettled and self.catalog.stale:
            refresh_catalog(self.catalog)  # only old: read again in the background meanwhile
        self._sync_views(snapshot)
        ctx = StatementContext(id=str(next(self._ids)), sql=sql, started=time.time(),
                               prepared=prepared_name is not None or bind is not None,
                               params=bind_params(bind) if bind is not None else None)
        # the rate counts runs: a Query, a Bind (below); a Parse alone runs nothing. Counted once,
        # before a long text goes off the loop (it comes back here with `analysed`)
        if analysed is None and prepared_name is None and (limited := self._rate_limited()) is not None:
            return self._audited(ctx, Verdict(error=limited, context=ctx), "deny")  # not a denial that counts
        offload = self.rt.offload
        if analysed is None and bind is None and offload is not None and len(sql) > offload.above_bytes:
            # a long text is analysed off the event loop within a time budget; this runs again with the result
            return Verdict(wait=offload.check(self, sql, prepared_name))
        if analysed is not None and analysed.error is not None:
            return self._refuse(ctx, analysed.error)
        try:
            # the shape's analysis from the lexical front (compiled) when filed, else the full path
            known = filed(sql, self.rt.search_path, self.state.server_version) if analysed is None else None
            analysis = known if known is not None else analyze(sql, self.rt.search_path, self.state.server_version)
            if analysed is not None:
                decision = analysed.decision
            elif self.policy is None:
                decision = None
            else:  # one analysis for the decision and the masking plan (the same search_path)
                same_path = self.state.search_path == self.rt.search_path
                last = self._decided
                if (last is not None and last[0] is analysis and last[1] is self.policy and same_path
                        and prepared_name is None):
                    decision = last[2]  # what the engine's cache by analysis would answer
                else:
                    decision = self.policy.decide(sql, self.state, prepare_as=prepared_name,
                                                  analysis=analysis if same_path else None)
                    if same_path and prepared_name is None and not analysis.session_dependent:
                        self._decided = (analysis, self.policy, decision)
        except Exception as e:  # the engine failing must never let a statement through
            log.exception("policy engine failed")
            return self._refuse(ctx, PolicyDenied(f"pgwarden could not decide this statement ({type(e).__name__})"))
        ctx.decision = decision
        facts = self._facts
        if facts is None or facts.analysis is not analysis or facts.decision is not decision:
            facts = self._facts = _Facts(analysis, decision)
        if facts.session_dependent:
            ctx.sql = shown_sql(sql, analysis, self.names)  # what EXECUTE runs, for reviewers and audit
        if decision is not None and facts.action == "deny" and facts.enforce:
            return self._refuse(ctx, decision.as_error())
        if facts.reserved:  # a name of the proxy's own (see _Facts)
            return self._refuse(ctx, PolicyDenied(
                f"pgwarden reserves names starting with {GUARD_PREFIX} (its own savepoint, statement and portal)",
                hint="Choose another name for the savepoint, prepared statement, cursor or object.",
            ))
        try:
            guard = self._limit_guard(decision, analysis) if facts.max_affected_rows is not None else None
        except AgentError as e:
            return self._refuse(ctx, e)
        results = None
        plan = None
        if self.masking is not None and snapshot is not None:
            if analysed is not None and analysed.plan is not None:
                plan = analysed.plan
            else:
                # the planner changes the session it is given only for texts that make or drop
                # names; those get a scratch copy (the registry is the one that changes)
                names_change = facts.names_change
                kept = self._planned
                if (kept is not None and kept[0] is facts.blind and kept[1] is snapshot and kept[2] is self.masking
                        and kept[3] is self.rt.search_path and not names_change):
                    plan = kept[4]  # the plan the masking's cache by shape holds for this text
                else:
                    plan = self.masking.plan(sql, snapshot, self.rt.search_path,
                                             session=self._scratch_session() if names_change else self.msession,
                                             blind=facts.blind)
                    if plan.by_shape and not names_change:
                        self._planned = (facts.blind, snapshot, self.masking, self.rt.search_path, plan)
            facts.plan_facts(plan)
            if facts.plan_error is not None:
                return self._refuse(ctx, facts.plan_error)
            results = plan if facts.masks_anything else None
        if self.rt.catalog is not None and (facts.plan_ddl if plan is not None else facts.schema_change):
            # also from a session nothing is masked for (an exempt subject): the sessions that are
            # masked read the relations it changes
            ctx.ddl = True
            self.names.watch_schema()
        max_rows = facts.max_rows
        # () unless the text makes or drops names (what statement_changes answers first itself)
        changes = statement_changes(sql, analysis, plan, max_rows) if facts.names_change else ()
        if prepared_name is not None:
            entry = PreparedEntry(
                prepared_name, sql, "parse", results=results, context=ctx, max_rows=max_rows,
                planned_with=(self.masking, snapshot) if self.masking is not None else None, decided_in=self.generation,
                guard=None if rebinds(analysis) else guard,  # EXECUTE / FETCH: decided at every Bind
                policy_body=analysis.statements[0] if len(analysis.statements) == 1 else None,
                run_changes=changes[0] if len(changes) == 1 else (), rebind=rebinds(analysis),
            )
            changes = ()
        runs = prepared_name is None  # a Parse runs nothing: the recording shows each Bind's run
        if decision is None:  # no AccessPolicy (defaultAction allow): masking still applies
            verdict = self._audited(ctx, Verdict(results=results, context=ctx), "allow", runs=runs)
        elif facts.action == "review" and facts.enforce:
            if bind is not None:
                verdict = Verdict(wait=self._review(ctx, decision, results, params=ctx.params or (), bind=bind,
                                                    guard=guard),
                                  context=ctx)
            elif prepared_name is not None:
                # Parsing is harmless; the human decides at Bind, when the parameters are known.
                entry.reviewed = (decision, results)
                verdict = self._audited(ctx, Verdict(results=results, context=ctx, max_rows=max_rows),
                                        "review-at-bind", runs=False)
            else:
                verdict = Verdict(wait=self._review(ctx, decision, results, guard=guard), context=ctx)
        else:
            verdict = self._audited(ctx, Verdict(results=results, context=ctx, max_rows=max_rows, guard=guard),
                                    "allow" if facts.action == "allow" else f"{facts.action}-audit-only",
                                    runs=runs)
        if prepared_name is not None:
            return _with(verdict, entry=entry)
        if bind is not None:  # what running it changes was captured at Parse (run_changes)
            return _with(verdict, pins=self._pins(analysis))
        return _with(verdict, changes=changes) if any(changes) else verdict

    def _pins(self, analysis: Any) -> tuple[tuple[str, str, Any], ...]:
        """The names a text decided at Bind looks up when it runs (EXECUTE's statements, FETCH's
        and MOVE's cursors), with what each meant now: the relay refuses the Execute when one
        means something else by then (a DEALLOCATE and PREPARE in between)."""
        return (*(("S", ex.name, self.names.statement(ex.name)) for st in analysis.statements for ex in st.executes),
                *(("P", name, self.names.portal(name)) for st in analysis.statements for name in st.fetches))

    def _limit_guard(self, decision: Any, analysis: Any) -> AffectedGuard | None:
        """The guard of limits.maxAffectedRows for a text that writes rows; PolicyDenied when the
        text writes in a way whose changed rows its command tag does not count."""
        limit = decision.limits.max_affected_rows if decision is not None else None
        if limit is None:
            return None
        stmts = analysis.statements
        # PREPARE runs nothing: its body is counted when an EXECUTE runs it
        writes = 0 if all(st.kind == "PrepareStmt" for st in stmts) else _dml_nodes(analysis.blind)
        bodies = [self.names.statement(ex.name) for st in analysis.statements for ex in st.executes]
        for body in bodies:
            if body is not None:
                writes += _dml_nodes(analyze(body.sql, self.rt.search_path, self.state.server_version).blind)
        # TRUNCATE and COPY … FROM change rows no command tag counts (COPY's tag does, but its
        # sub-protocol cannot be held): refused under the limit
        uncounted = any(k in analysis.blind for k in _UNCOUNTED_KEYS)
        if not writes and not uncounted:
            return None
        one = stmts[0] if len(stmts) == 1 else None
        countable = not uncounted and one is not None and writes == 1 and (
            one.kind in _DML_KINDS
            or (one.kind == "ExecuteStmt" and len(bodies) == 1 and bodies[0] is not None
                and getattr(bodies[0].policy_body, "kind", "") in _DML_KINDS)
        )
        if not countable:
            raise PolicyDenied(
                f"pgwarden cannot bound the rows this text changes (limits.maxAffectedRows of {decision.rule}): "
                "only a single INSERT, UPDATE, DELETE or MERGE statement, with no other statement in the same "
                "text and no data-modifying WITH, is counted (not TRUNCATE, not COPY … FROM)",
                hint="Send the write alone, as one top-level INSERT, UPDATE, DELETE or MERGE statement.",
            )
        return AffectedGuard(limit=limit, source=f"limits.maxAffectedRows of {decision.rule}")

    def _refuse(self, ctx: StatementContext, err: AgentError) -> Verdict:
        verdict = Verdict(error=self._count_refusal(err), context=ctx)
        return self._audited(ctx, verdict, "deny")

    # -- the circuit breaker (proxy/circuit.py) ---------------------------------------------------
    def _count_refusal(self, err: AgentError) -> AgentError:
        """A refused statement counts towards limits.maxDenials; past it the session ends (PW006)
        and the identity is locked out. Only policy and masking refusals (42501) and reviewers'
        denials (PW002) count: not the rate limit, not the proxy's own failures."""
        breaker = self.rt.breaker
        limit = self.policy.limits.max_denials if self.policy is not None else None
        if breaker is None or limit is None or err.sqlstate not in ("42501", "PW002"):
            return err
        subject = self.info.identity.subject
        lk = breaker.refused(subject, limit.count, limit.window, limit.lockout, err.message)
        if lk is None:
            return err
        until = iso(lk.until)
        lift = f"pgwarden lockouts lift {subject!r} --state {breaker.path}" if breaker.path else "restart the proxy"
        if self.rt.audit is not None:
            rec = self.ainfo.base("lockout")
            rec.update(lockout={"subject": subject, "until": until, "refused": lk.refused,
                                "window": limit.window, "count": limit.count, "lastRefusal": err.message})
            self.rt.audit.emit(rec)
        self._notify_lockout(subject, until, lk.refused, limit.window)
        log.warning("%s locked out until %s after %d refused statements", subject, until, lk.refused)
        return LockedOut(
            f"pgwarden ended this session: {lk.refused} statements were refused within {limit.window:g}s "
            f"(limits.maxDenials allows {limit.count}); {subject} may not connect through this proxy until "
            f"{until}. The last refusal: {err.message}",
            hint="Stop retrying refused statements and ask the policy owner. Whoever runs this proxy can lift "
                 f"the lockout early: {lift} (in a cluster, from the pgwarden-proxy container).",
        )

    def _notify_lockout(self, subject: str, until: str, refused: int, window: float) -> None:
        from pgwarden.approvals.model import mrkdwn_code

        notifier = self.rt.approvals.notifier if self.rt.approvals is not None else None
        if notifier is None or self.policy is None:
            return
        # the approval webhook of the policies that apply to this identity
        url = next((p.approval.notify_url for p in self.policy.policies
                    if p.approval is not None and p.approval.notify_url), "")
        who = mrkdwn_code(" ".join(subject.split()))[0]
        notifier.notify_text(url, f":no_entry: pgwarden locked out `{who}` on `{mrkdwn_code(self.rt.connection)[0]}` "
                                  f"until {until}: {refused} statements refused within {window:g}s.")

    def _rate_limited(self) -> AgentError | None:
        per_minute = self.policy.limits.max_statements_per_minute if self.policy is not None else None
        breaker = self.rt.breaker
        if per_minute is None or breaker is None or breaker.statement(self.info.identity.subject, per_minute):
            return None
        return RateLimited(
            f"pgwarden refused this statement: more than {per_minute} statements in the last minute from "
            f"{self.info.identity.subject} (limits.maxStatementsPerMinute); nothing was sent to the database",
            hint="Wait a few seconds and retry, or batch the work into fewer statements.",
        )

    def _shown(self, d: Any) -> tuple[str, str, dict[str, Any]]:
        """Decision `d`'s rule, reasons and policy summary as records show them. The last one is
        kept: a session runs the same decision over and over (the engine hands back one object per
        decision), and records are serialized, never changed, so they may share the summary."""
        last = self._last_shown
        if last is not None and last[0] is d:
            return last[1]
        shown: tuple[str, str, dict[str, Any]] = (
            getattr(d, "rule", "") or "", "; ".join(getattr(d, "reasons", ()) or ()),
            {} if d is None else {"policy": {"operations": list(d.operations), "tables": list(d.tables),
                                             "mode": "enforce" if d.enforce else "audit"}},
        )
        self._last_shown = (d, shown)
        return shown

    def _record(self, ctx: StatementContext, outcome: str, verdict: Verdict) -> records.Record:
        rule, reason, extra = self._shown(ctx.decision)
        if verdict.error is not None:
            extra = {**extra, "refusal": {"sqlstate": verdict.error.sqlstate, "message": verdict.error.message}}
        return records.statement_record(
            self.ainfo,
            ctx.id,
            ctx.sql,
            decision=outcome,
            rule=rule,
            reason=reason,
            protocol="extended" if ctx.prepared else "simple",
            params=ctx.params,
            mask_text=self._scrub,
            approval_id=ctx.approval_id,
            approver=ctx.approver,
            masked_columns=ctx.masked_columns,
            extra=extra,
        )

    def _audited(self, ctx: StatementContext, verdict: Verdict, outcome: str, *, runs: bool = True) -> Verdict:
        """Hold the statement until its audit record is durable (PW004 if it cannot be).
        `runs`: False for a Parse that was let through: the recording shows a run (with its
        values) at each Bind, not the Parse."""
        if self.rt.audit is None:
            self._note(ctx, verdict, runs)
            return verdict
        if self.rt.audit.inline:  # durability: write — in the kernel now, no hold
            self._note(ctx, verdict, runs)
            return self._written(self._record(ctx, outcome, verdict), verdict)
        return Verdict(wait=self._durable(ctx, verdict, outcome, runs), context=ctx)

    def _written(self, record: records.Record, verdict: Verdict) -> Verdict:
        """`verdict` once `record` is written (durability: write, on this thread), else held
        until it is durable; PW004 (nothing forwarded) if it cannot be."""
        audit = self.rt.audit
        if audit is None:  # callers write records only when an audit log is configured
            return verdict
        if not audit.inline:
            return Verdict(wait=self._write(record, verdict), context=verdict.context)
        try:
            audit.write_now(record)
        except Exception as e:
            return _unwritten(e, verdict)
        return verdict

    def _note(self, ctx: StatementContext, verdict: Verdict, runs: bool = True) -> None:
        """The session recording sees every decided run of a statement, and every refusal."""
        if self.recorder is not None and (runs or verdict.error is not None):
            self.recorder.statement(ctx.id, ctx.sql, ctx.params)
            if verdict.error is not None:
                self.recorder.error(ctx.id, {"C": verdict.error.sqlstate, "M": verdict.error.message})

    async def _write(self, record: records.Record, verdict: Verdict) -> Verdict:
        """`verdict` once `record` is durable; PW004 (nothing forwarded) if it cannot be."""
        if self.rt.audit is None:
            return verdict
        try:
            await self.rt.audit.write(record)
        except Exception as e:
            return _unwritten(e, verdict)
        return verdict

    async def _durable(self, ctx: StatementContext, verdict: Verdict, outcome: str, runs: bool = True) -> Verdict:
        self._note(ctx, verdict, runs)
        if self.rt.audit is None:
            return verdict
        return await self._write(self._record(ctx, outcome, verdict), verdict)

    async def _approval_event(self, ctx: StatementContext, event: str, approver: str = "", reason: str = "",
                              preview: Any = None) -> None:
        """Every approval step is an audit record, written before the step takes effect."""
        if self.rt.audit is not None:
            await self.rt.audit.write(
                records.approval(self.ainfo, ctx.id, approval_id=ctx.approval_id, event=event, approver=approver,
                                 reason=reason, preview=preview.to_json() if preview is not None else None)
            )

    # -- approval previews (proxy/preview.py) -----------------------------------------------------
    async def _preview(self, ctx: StatementContext, decision: Any, bind: m.BindMsg | None) -> Any:
        """What the held statement would change (approval.preview: rows), measured before the
        request is filed; None when the policy asks for no preview."""
        from pgwarden.approvals.model import Preview
        from pgwarden.proxy.preview import measure

        a = decision.approval
        if a is None or a.preview != "rows":
            return None
        cfg = self.rt.proxy_config
        if cfg is None:
            return Preview("unavailable", reason="this proxy has no upstream connection settings for previews")
        settings = {**self.info.params, **self.rt.upstream_settings(self.info.identity)}
        return await measure(
            cfg, settings, ctx.sql, params=bind.params if bind is not None else (),
            formats=bind.param_formats if bind is not None else (), timeout=a.preview_timeout,
            server_version=self.state.server_version, mask_rows=self._preview_masker, mask_error=self._preview_error,
        )

    def _preview_plan(self, sql: str) -> Any:
        assert self.masking is not None
        return self.masking.plan(sql, self.catalog.current(), self.rt.search_path, session=self._scratch_session())

    def _preview_masker(self, preview: Any) -> Any:
        """The preview's sample is masked as the agent would see the same rows (RETURNING them).
        An UPDATE's "before" columns come from a snapshot of the target the lineage sees as one
        composite (all derived); they are masked as the target's own columns, in the same order."""
        from pgwarden.masking.rows import make_row_rewriter
        from pgwarden.masking.subject import confirmed_by_server

        if self.masking is None:
            return None
        plan = self._preview_plan(preview.sql)
        if plan.error is not None:
            return plan.error.message
        result = plan.results[0]
        if not preview.before_sql:
            def masker(fields: Any) -> Any:
                rewriter = result.bind(fields)
                return rewriter.rewrite if rewriter is not None else None

            return masker
        before_plan = self._preview_plan(preview.before_sql)
        if before_plan.error is not None:
            return before_plan.error.message
        before = before_plan.results[0]
        catalog = self.catalog.current()
        masking = self.masking

        def update_masker(fields: Any) -> Any:
            fields = list(fields)
            actions = result.actions(len(fields))
            start = 1  # the count, then the target's columns before the change and after it
            half = (len(fields) - start) // 2
            names = [f.name for f in fields[start:]]
            if half * 2 != len(fields) - start or names[:half] != names[half:]:
                actions = ["derived"] * len(fields)  # not the shape planned: mask every value
            else:
                actions[start:start + half] = before.actions(half)
                actions = confirmed_by_server(actions, fields, catalog, masking)
            rewriter = make_row_rewriter(actions, fields, masking, catalog)
            return rewriter.rewrite if rewriter is not None else None

        return update_masker

    def _preview_error(self, sql: str, fields: dict[str, str]) -> dict[str, str]:
        """The preview's error, as the agent would see it (a key conflict can print a masked value)."""
        if self.masking is None:
            return fields
        plan = self._preview_plan(sql)
        if plan.error is not None:  # no plan to mask by: keep the SQLSTATE only
            return {"C": fields.get("C", ""), "M": "the error text is withheld (masking could not plan the preview)"}
        masked: dict[str, str] = self.masking.mask_error_fields(fields, plan, self.catalog.current())
        return masked

    @staticmethod
    def _guarded(verdict: Verdict, ticket: Any, preview: Any) -> Verdict:
        """An approved write is bound to the effect its reviewer saw: it may change no more rows
        (nor more than limits.maxAffectedRows, whichever is smaller)."""
        if preview is not None and preview.measured:
            seen = AffectedGuard(limit=preview.affected_rows, source=f"request {ticket.name}")
            verdict.guard = stricter(verdict.guard, seen)
        return verdict

    async def _review(self, ctx: StatementContext, decision: Any, results: Any,
                      params: tuple[str | None, ...] = (), bind: m.BindMsg | None = None,
                      guard: AffectedGuard | None = None) -> Verdict:
        """A `review` decision: ask a human (wait: hold the statement; defer: PW001 now, run once later)."""
        from pgwarden.approvals import ApprovalSpec

        backend = self.rt.approvals
        if backend is None:  # no approval backend configured: the statement cannot run
            return await self._durable(ctx, Verdict(error=decision.as_error(), context=ctx), "review")
        a = decision.approval
        spec = ApprovalSpec(
            connection=self.rt.connection,
            requester=self.info.identity,
            workload=self.rt.workload.as_dict(),
            statement=ctx.sql,
            params=params,
            rule=decision.rule,
            reviewers=tuple(a.reviewers),
            min_approvals=a.min_approvals,
            timeout=a.timeout,
            mode=a.mode,
            notify_url=a.notify_url,
        )
        try:
            if a.mode == "defer":
                ticket = await backend.consume(spec)
                if ticket is not None:
                    # attributed in the chain before the statement is forwarded, as in wait mode
                    ctx.approval_id, ctx.ticket = ticket.id, ticket
                    ctx.approver = ticket.decided_by or "(the approval backend did not say)"
                    await self._approval_event(ctx, "approved", approver=ctx.approver,
                                               reason="a deferred approval is used for this run")
                    verdict = Verdict(results=results, context=ctx, max_rows=decision.limits.max_rows, guard=guard)
                    return await self._durable(ctx, self._guarded(verdict, ticket, ticket.preview), "approved")
            # measured before the request exists, so the reviewer sees it from the first moment
            preview = await self._preview(ctx, decision, bind)
            spec = replace(spec, preview=preview)
            ticket = await backend.create(spec)
        except AgentError as e:
            return await self._durable(ctx, Verdict(error=e, context=ctx), "review")
        ctx.approval_id = ticket.id
        await self._approval_event(ctx, "requested", preview=preview)
        if self.notify_client is not None:
            self.notify_client(
                m.notice_response(
                    f"pgwarden: this statement needs approval (request {ticket.name}); "
                    + ("waiting for a reviewer" if a.mode == "wait" else "run it again once approved"),
                    hint=f"A reviewer approves with: {ticket.approve_command}",
                )
            )
        if a.mode == "defer":
            err = ApprovalRequired(
                f"approval required by {decision.rule}: request {ticket.name} was created",
                hint=f"Ask a reviewer to run: {ticket.approve_command} — then run the identical statement again.",
            )
            return await self._durable(ctx, Verdict(error=err, context=ctx), "review")
        try:
            outcome = await backend.wait(ticket, a.timeout)
        except asyncio.CancelledError:  # the client cancelled: the request is withdrawn
            await backend.withdraw(ticket)
            await self._approval_event(ctx, "withdrawn")
            raise
        await self._approval_event(ctx, outcome.state, approver=outcome.decided_by, reason=outcome.reason)
        if outcome.state == "approved":
            ctx.ticket, ctx.approver = ticket, outcome.decided_by
            verdict = Verdict(results=results, context=ctx, max_rows=decision.limits.max_rows, guard=guard)
            return await self._durable(ctx, self._guarded(verdict, ticket, preview), "approved")
        if outcome.state == "denied":
            err2: AgentError = ApprovalDenied(
                f"request {ticket.name} was denied by {outcome.decided_by}" + (f": {outcome.reason}" if outcome.reason else ""),
                hint="Change the statement or talk to the reviewer.",
            )
        else:
            err2 = ApprovalExpired(
                f"request {ticket.name} was not approved within {a.timeout:g}s",
                hint="Run the statement again to create a new request, or ask a reviewer to be ready.",
            )
        return await self._durable(ctx, Verdict(error=self._count_refusal(err2), context=ctx), outcome.state)

    async def _executed(self, ctx: StatementContext, ticket: Any, tag: str) -> None:
        if self.rt.approvals is None:
            return
        try:
            await self.rt.approvals.executed(ticket, tag)
            await self._approval_event(ctx, "executed", reason=tag)
        except Exception:
            log.exception("could not record the execution of approval %s", ticket.id)

    def mask_error(self, fields: dict[str, str], plan: Any) -> dict[str, str]:
        """ErrorResponse / NoticeResponse text can print a masked value (a failed cast, a key conflict)."""
        if self.masking is None:
            return fields
        masked: dict[str, str] = self.masking.mask_error_fields(fields, plan, self.catalog.current())
        return masked

    # -- Observer -------------------------------------------------------------------------------
    def statement_done(self, context: Any, tag: str, error: dict[str, str] | None, undone: bool = False) -> None:
        if not isinstance(context, StatementContext):
            return
        self.statements += 1
        if context.ticket is not None and self.rt.approvals is not None:
            ticket, context.ticket = context.ticket, None
            ran = (error or {}).get("C", "") if undone else tag or (error or {}).get("C", "")
            self.rt.spawn(self._executed(context, ticket, ran))
        if context.ddl and self.rt.catalog is not None:
            self.rt.catalog.mark_stale()  # a new or altered relation: re-read before the next plan
        rows = m.command_tag_rows(tag) if tag else None
        if self.recorder is not None:
            if error:
                self.recorder.error(context.id, error)
            else:
                self.recorder.complete(context.id, tag, rows)
        if self.rt.audit is not None:
            self.rt.audit.emit(
                records.outcome_record(
                    self.ainfo, context.id, started=context.started, tag=tag, rows=rows,
                    sqlstate=error.get("C", "") if error else "", message=error.get("M", "") if error else "",
                    undone=undone,
                )
            )

    def server_error(self, fields: dict[str, str]) -> None:
        if self.recorder is not None:
            self.recorder.error("-", fields)

    def result_columns(self, context: Any, fields: tuple[m.Field, ...]) -> bool:
        if self.recorder is None or not isinstance(context, StatementContext):
            return False
        shape = self._shape
        if shape is None or (shape[0] is not fields and shape[0] != fields):  # the same few shapes again and again
            shape = self._shape = (fields, tuple([f.name for f in fields]), tuple([f.type_oid for f in fields]),
                                   [f.format for f in fields])
        self.recorder.columns(context.id, shape[1], shape[2])
        self._formats = shape[3]
        return True

    def result_row(self, context: Any, payload: bytes) -> bool:
        assert self.recorder is not None
        return self.recorder.row_payload(context.id, payload, self._formats)

    def session_end(self, reason: str) -> None:
        self.names.settle_schema()  # a change left open is rolled back with the session
        if self.recorder is not None:
            self.recorder.close(reason)
        if self.rt.audit is not None:
            self.rt.audit.emit(
                records.session_end(
                    self.ainfo, duration_ms=(time.time() - self.info.started) * 1000, statements=self.statements, reason=reason
                )
            )
