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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pgwarden.proxy import messages as m
from pgwarden.proxy.relay import Verdict

from pgwarden.errors import (
    AgentError,
    ApprovalDenied,
    ApprovalExpired,
    AuditUnavailable,
    PolicyDenied,
)

log = logging.getLogger("pgwarden.proxy.gate")


@dataclass
class StatementContext:
    """What the relay hands back with a statement's outcome."""

    id: str
    sql: str
    started: float
    decision: Any = None
    approval_id: str = ""


@dataclass
class Runtime:
    """Everything built once per proxy from the configuration documents."""

    connection: str
    search_path: tuple[str, ...]
    policies: Any = None  # pgwarden.policy.PolicySet
    masking: Any = None  # pgwarden.masking.MaskingSet
    catalog: Any = None  # pgwarden.masking catalog cache
    audit: Any = None  # pgwarden.audit.AuditLog
    recorder_factory: Callable[[Any], Any] | None = None
    approvals: Any = None  # pgwarden.approvals.ApprovalBackend
    workload: dict[str, str] = field(default_factory=dict)


class SessionGate:
    def __init__(self, rt: Runtime, info: Any, notify_client: Callable[[bytes], None] | None = None) -> None:
        from pgwarden.policy import SessionState

        self.rt = rt
        self.info = info
        self.notify_client = notify_client
        self.policy = rt.policies.for_identity(info.identity, rt.connection)
        self.state = SessionState(search_path=list(rt.search_path))
        self.masking = rt.masking.for_identity(info.identity, rt.connection) if rt.masking is not None else None
        self.recorder = rt.recorder_factory(info) if rt.recorder_factory is not None else None
        self._ids = itertools.count(1)

    # -- Gate -----------------------------------------------------------------------------------
    def query(self, sql: str) -> Verdict | None:
        return self._check(sql, None)

    def parse(self, name: str, sql: str) -> Verdict | None:
        return self._check(sql, name)

    def bind(self, bind: m.BindMsg) -> Verdict | None:
        return None

    def _check(self, sql: str, prepared_name: str | None) -> Verdict:
        ctx = StatementContext(id=f"{self.info.id}/{next(self._ids)}", sql=sql, started=time.time())
        try:
            decision = self.policy.decide(sql, self.state)
        except Exception as e:  # the engine failing must never let a statement through
            log.exception("policy engine failed")
            return self._refuse(ctx, PolicyDenied(f"pgwarden could not decide this statement ({type(e).__name__})"))
        ctx.decision = decision
        if decision.action == "deny" and decision.enforce:
            return self._refuse(ctx, decision.as_error())
        results = None
        if self.masking is not None and self.rt.catalog is not None:
            plan = self.masking.plan(sql, self.rt.catalog.current(), tuple(self.rt.search_path))
            if plan.error is not None:
                return self._refuse(ctx, plan.error)
            results = plan if plan.masks_anything else None
        if decision.action == "review" and decision.enforce:
            return Verdict(wait=self._review(ctx, decision, results), context=ctx)
        verdict = Verdict(results=results, context=ctx)
        return self._audited(ctx, verdict, "allow" if decision.action == "allow" else f"{decision.action}-audit-only")

    def _refuse(self, ctx: StatementContext, err: AgentError) -> Verdict:
        verdict = Verdict(error=err, context=ctx)
        return self._audited(ctx, verdict, "deny")

    def _record(self, ctx: StatementContext, outcome: str, **extra: Any) -> dict[str, Any]:
        d = ctx.decision
        rec: dict[str, Any] = {
            "type": "statement",
            "session": self.info.id,
            "statement_id": ctx.id,
            "identity": self.info.identity.as_dict(),
            "workload": self.rt.workload,
            "connection": self.rt.connection,
            "application_name": self.info.application_name,
            "statement": ctx.sql,
            "decision": outcome,
        }
        if d is not None:
            rec["rule"] = d.rule
            rec["reasons"] = list(d.reasons)
        rec.update(extra)
        return rec

    def _audited(self, ctx: StatementContext, verdict: Verdict, outcome: str) -> Verdict:
        """Hold the statement until its audit record is durable (PW004 if it cannot be)."""
        if self.rt.audit is None:
            return verdict
        return Verdict(wait=self._durable(ctx, verdict, outcome), context=ctx)

    async def _durable(self, ctx: StatementContext, verdict: Verdict, outcome: str) -> Verdict:
        if self.rt.audit is None:
            return verdict
        record = self._record(ctx, outcome)
        if ctx.approval_id:
            record["approval_id"] = ctx.approval_id
        if verdict.error is not None:
            record["sqlstate"] = verdict.error.sqlstate
            record["error"] = verdict.error.message
        try:
            await self.rt.audit.write(record)
        except AuditUnavailable as e:
            return Verdict(error=e, context=ctx)
        except Exception as e:  # any sink failure closes the gate
            log.exception("audit write failed")
            return Verdict(
                error=AuditUnavailable(f"the audit record could not be written ({type(e).__name__}); nothing was forwarded"),
                context=ctx,
            )
        return verdict

    async def _review(self, ctx: StatementContext, decision: Any, results: Any) -> Verdict:
        from pgwarden.approvals import ApprovalSpec

        backend = self.rt.approvals
        if backend is None:
            return await self._durable(ctx, Verdict(error=decision.as_error(), context=ctx), "review")
        a = decision.approval
        spec = ApprovalSpec(
            connection=self.rt.connection,
            requester=self.info.identity,
            workload=self.rt.workload,
            statement=ctx.sql,
            params=(),
            rule=decision.rule,
            reviewers=tuple(a.reviewers),
            min_approvals=a.min_approvals,
            timeout=a.timeout,
            mode=a.mode,
        )
        if a.mode == "defer":
            ticket = await backend.consume(spec)
            if ticket is not None:
                ctx.approval_id = ticket.id
                return await self._durable(ctx, Verdict(results=results, context=ctx), "approved")
        ticket = await backend.create(spec)
        ctx.approval_id = ticket.id
        if self.notify_client is not None:
            self.notify_client(
                m.notice_response(
                    f"pgwarden: this statement needs approval (request {ticket.name}); "
                    + ("waiting for a reviewer" if a.mode == "wait" else "run it again once approved"),
                    hint=f"A reviewer approves with: {ticket.approve_command}",
                )
            )
        if a.mode == "defer":
            from pgwarden.errors import ApprovalRequired

            err = ApprovalRequired(
                f"approval required by {decision.rule}: request {ticket.name} was created",
                hint=f"Ask a reviewer to run: {ticket.approve_command} — then run the identical statement again.",
            )
            return await self._durable(ctx, Verdict(error=err, context=ctx), "review")
        try:
            outcome = await backend.wait(ticket, a.timeout)
        except asyncio.CancelledError:
            await backend.withdraw(ticket)
            raise
        if outcome.state == "approved":
            return await self._durable(ctx, Verdict(results=results, context=ctx), "approved")
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
        return await self._durable(ctx, Verdict(error=err2, context=ctx), outcome.state)

    # -- Observer -------------------------------------------------------------------------------
    def statement_done(self, context: Any, tag: str, error: dict[str, str] | None) -> None:
        if self.rt.audit is None or not isinstance(context, StatementContext):
            return
        rec = {
            "type": "outcome",
            "session": self.info.id,
            "statement_id": context.id,
            "tag": tag,
            "rows": m.command_tag_rows(tag) if tag else None,
            "duration_ms": round((time.time() - context.started) * 1000, 3),
        }
        if error:
            rec["sqlstate"] = error.get("C", "")
        self.rt.audit.emit(rec)

    def server_error(self, fields: dict[str, str]) -> None:
        pass
