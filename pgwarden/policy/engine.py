"""Deciding an analysed statement against the AccessPolicies of one subject.

How several policies combine (docs/policy.md says the same):

* Each access (an operation on an object, e.g. `delete` on `public.orders`) is matched against
  every applicable policy's ordered rules; in each policy the first matching rule speaks.
* Explicit rule results combine strictest-first: **deny wins over review wins over allow**.
* Only when no policy has a rule for the access does the fallback apply: reads of system
  catalogs (`systemCatalogs: read`, the default), then `defaultAction` — the strictest of the
  applicable policies' defaults.
* A text with several statements is decided as a whole: the strictest statement decides, so
  `SELECT 1; DROP TABLE x` is denied and nothing of it may be forwarded.
* Built-in guards (opaque code, dangerous functions, identity changes, files, unparseable
  text, unknown functions) deny whatever the policies say, and even in audit mode.
* `mode: audit` relaxes only rule and default outcomes: the decision keeps its action but
  `enforce` is False unless an enforcing policy contributed the same outcome.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pgwarden.cache import BoundedCache
from pgwarden.errors import AgentError, ApprovalRequired, PolicyDenied
from pgwarden.policy import functions as fn
from pgwarden.policy.analysis import (
    CATALOG_SCHEMAS,
    SENSITIVE_CATALOG_RELATIONS,
    Access,
    Analysis,
    Deallocate,
    Effect,
    FunctionUse,
    Prepare,
    StatementAnalysis,
    analyze,
    display,
)
from pgwarden.policy.model import (
    ANY,
    OPERATIONS,
    SEVERITY,
    AccessPolicy,
    Action,
    ApprovalSettings,
    Limits,
    Rule,
)
from pgwarden.subjects import Identity

BUILTIN = "builtin"
DECISION_CACHE_SIZE = 1024
MAX_CACHED_TEXT = 4096


@dataclass
class SessionState:
    """Per-connection state the decisions depend on, one per client session.

    `search_path` is what the proxy pins on the server session (unqualified table names resolve
    against it). `prepared` maps SQL-level PREPARE names — and named extended-protocol statements,
    which share PostgreSQL's namespace — to the analysis of their body, so `EXECUTE name` is
    decided as what it runs. In the proxy it is a view of the session registry
    (pgwarden.proxy.session), which changes only when the server confirms a command; offline
    users (`policy explain`, tests) change it with `apply()` / `forget()`.
    `server_version` is the server's major version (its `server_version` at login; 0 = unknown,
    taken as the newest pgwarden knows): pg_catalog's names differ between releases.
    """

    search_path: tuple[str, ...] = ("public",)
    prepared: dict[str, StatementAnalysis] = field(default_factory=dict)
    server_version: int = 0

    def __post_init__(self) -> None:
        self.search_path = tuple(self.search_path)
        for schema in self.search_path:
            if not schema or schema.startswith("$"):
                raise ValueError(f"search_path entries must be plain schema names, got {schema!r}")

    def apply(self, decision: Decision) -> None:
        """Record the decision's PREPARE / DEALLOCATE effects; call it when the text was forwarded."""
        apply_effects(self.prepared, decision.session_effects)

    def forget(self, name: str) -> None:
        """An extended-protocol Close of a named statement."""
        self.prepared.pop(name, None)

    def reset(self) -> None:
        """The server session was replaced (reconnect): nothing is prepared any more."""
        self.prepared.clear()


def apply_effects(prepared: dict[str, StatementAnalysis], effects: Iterable[Effect]) -> None:
    for e in effects:
        if isinstance(e, Prepare):
            prepared[e.name] = e.body
        elif e.name is None:
            prepared.clear()
        else:
            prepared.pop(e.name, None)


@dataclass(frozen=True)
class Decision:
    """The verdict on one Query / Parse text, with everything the proxy, audit and errors need."""

    action: Action
    enforce: bool = True  # False: audit mode, the proxy forwards it and logs what would have happened
    sqlstate: str = ""
    message: str = ""
    hint: str = ""
    rule: str = BUILTIN
    operations: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    limits: Limits = Limits()
    approval: ApprovalSettings | None = None
    policies: tuple[str, ...] = ()
    accesses: tuple[tuple[str, str, str, str], ...] = ()  # (operation, object, action, rule)
    session_effects: tuple[Effect, ...] = ()
    statements: int = 0

    @property
    def forwarded(self) -> bool:
        """Whether the proxy may forward the text without a human (allow, or not enforced)."""
        return self.action == "allow" or not self.enforce

    def as_error(self) -> AgentError:
        """The error the proxy sends for a deny (42501) or review (PW001) decision."""
        if self.action == "deny":
            return PolicyDenied(self.message, hint=self.hint)
        if self.action == "review":
            return ApprovalRequired(self.message, hint=self.hint)
        raise ValueError("an allowed statement has no error")

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "enforce": self.enforce,
            "sqlstate": self.sqlstate or None,
            "message": self.message,
            "hint": self.hint,
            "rule": self.rule,
            "operations": list(self.operations),
            "tables": list(self.tables),
            "functions": list(self.functions),
            "reasons": list(self.reasons),
            "limits": self.limits.to_json(),
            "approval": self.approval.to_json() if self.approval else None,
            "policies": list(self.policies),
            "accesses": [{"operation": o, "object": t, "action": a, "rule": r} for o, t, a, r in self.accesses],
            "sessionEffects": [e.describe() for e in self.session_effects],
            "statements": self.statements,
        }


@dataclass(frozen=True)
class _Verdict:
    """One contributor to a decision: an access, a function call or a built-in guard."""

    action: Action
    rule: str
    reason: str
    enforce: bool = True
    approval: ApprovalSettings | None = None
    hint: str = ""


class SubjectPolicy:
    """The policies that apply to one identity on one connection; decides texts, caches decisions."""

    def __init__(self, identity: Identity, connection: str, policies: Iterable[AccessPolicy],
                 tried: str = "") -> None:
        self.identity = identity
        self.connection = connection
        self.policies = tuple(policies)
        self._tried = tried
        self.limits = Limits()
        for p in self.policies:
            self.limits = self.limits.combine(p.limits)
        self._cache: BoundedCache[tuple[str, tuple[str, ...], int], Decision] = BoundedCache(DECISION_CACHE_SIZE)
        self._by_analysis: BoundedCache[int, tuple[Analysis, Decision]] = BoundedCache(DECISION_CACHE_SIZE)
        self._summary = _allowed_summary(self.policies)

    # -- public --------------------------------------------------------------------------------

    def decide(self, sql: str, session: SessionState, *, prepare_as: str | None = None,
               analysis: Analysis | None = None) -> Decision:
        """Decide a simple-protocol Query text or an extended-protocol Parse text as a whole.

        `prepare_as` is the statement name of a named Parse: the decision then carries the
        effect that registers it, so a later SQL `EXECUTE name` is decided as its body.
        The session is not changed here: the proxy's registry records the effects statement by
        statement as the server confirms them; offline callers use `session.apply(decision)`.

        `analysis`: `analyze(sql, session.search_path, session.server_version)`, when the caller
        made it already (the proxy: one analysis feeds the decision and the masking plan). The
        decision is then found by the analysis alone: texts that differ only in literals share
        it, so a cache by text would only churn.
        """
        key = (sql, session.search_path, session.server_version) if analysis is None else None
        if prepare_as is None and key is not None:
            cached = self._cache.get(key, touch=True)
            if cached is not None:
                return cached
        if analysis is None:
            analysis = analyze(sql, session.search_path, session.server_version)
        if prepare_as is None and not analysis.session_dependent:
            # the analysis object is shared by texts that differ only in literals (see
            # analysis.blind_tree); the identity check guards against a recycled id()
            hit = self._by_analysis.get(id(analysis))
            if hit is not None and hit[0] is analysis:
                return hit[1]
        decision = self._decide(analysis, session, prepare_as)
        if prepare_as is None and not analysis.session_dependent:
            self._by_analysis.put(id(analysis), (analysis, decision))
        if key is not None and prepare_as is None and not analysis.session_dependent and len(sql) <= MAX_CACHED_TEXT:
            self._cache.put(key, decision)
        return decision

    # -- deciding ------------------------------------------------------------------------------

    def _decide(self, analysis: Analysis, session: SessionState, prepare_as: str | None) -> Decision:
        if analysis.error is not None:
            v = _Verdict("deny", BUILTIN, f"{analysis.error}",
                         hint="Fix the SQL; pgwarden denies what it cannot parse.")
            return self._build([v], (), [], (), 0)
        prepared = dict(session.prepared)  # effects of earlier statements in the same text count
        verdicts: list[_Verdict] = []
        accesses: list[tuple[str, str, str, str]] = []
        funcs: list[str] = []
        effects: list[Effect] = []
        for stmt in analysis.statements:
            verdicts.extend(self._statement(stmt, prepared, accesses, funcs, effects))
        if prepare_as:
            if len(analysis.statements) != 1:
                verdicts.append(_Verdict("deny", BUILTIN, "a prepared statement must hold exactly one statement"))
            else:
                verdicts.extend(self._prepare(prepare_as, analysis.statements[0], prepared, effects))
        return self._build(verdicts, tuple(effects), accesses, tuple(dict.fromkeys(funcs)), len(analysis.statements))

    def _statement(self, stmt: StatementAnalysis, prepared: dict[str, StatementAnalysis],
                   accesses: list[tuple[str, str, str, str]], funcs: list[str],
                   effects: list[Effect]) -> list[_Verdict]:
        out = [_Verdict("deny", BUILTIN, v) for v in stmt.violations]
        for a in stmt.accesses:
            v = self._access(a)
            accesses.append((a.operation, display(a.obj), v.action, v.rule))
            out.append(v)
        for f in stmt.functions:
            funcs.append(f.display)
            out.append(self._function(f))
        for s in stmt.settings:
            limit = self.limits.statement_timeout
            if limit is not None and (s.value_ms is None or s.value_ms <= 0 or s.value_ms > limit * 1000):
                out.append(_Verdict("deny", BUILTIN,
                                    f"{s.name} must stay between 1ms and the policy's statementTimeout "
                                    f"({limit:g}s); RESET and 0 (no limit) are not allowed"))
        for ex in stmt.executes:
            body = prepared.get(ex.name)
            if body is None:
                out.append(_Verdict("deny", BUILTIN, f"EXECUTE {ex.name}: no statement of that name was "
                                                     "prepared through pgwarden in this session"))
                continue
            if ex.explain_only:
                body = StatementAnalysis(kind=body.kind, accesses=tuple(Access("select", a.obj) for a in body.accesses),
                                         functions=body.functions, violations=body.violations)
            out.extend(self._statement(body, prepared, accesses, funcs, []))
        for e in stmt.effects:
            if isinstance(e, Prepare):
                out.extend(self._prepare(e.name, e.body, prepared, effects))
            else:
                effects.append(e)
                apply_effects(prepared, [e])
        return out

    def _prepare(self, name: str, body: StatementAnalysis, prepared: dict[str, StatementAnalysis],
                 effects: list[Effect]) -> list[_Verdict]:
        """PREPARE is allowed when its body is not denied; the body's review waits for EXECUTE."""
        if name in prepared:
            return [_Verdict("deny", BUILTIN, f"a statement named {name} is already prepared in this session; "
                                              f"DEALLOCATE {name} first")]
        inner = self._statement(body, prepared, [], [], [])
        denied = [v for v in inner if v.action == "deny" and v.enforce]
        if denied:
            return denied
        effect = Prepare(name, body)
        effects.append(effect)
        apply_effects(prepared, [effect])
        return []

    def _access(self, a: Access) -> _Verdict:
        what = f"{a.operation} on {display(a.obj)}" if a.obj is not None else a.operation
        if not self.policies:
            return self._no_policy(what)
        explicit: list[tuple[AccessPolicy, Rule, Action]] = []
        for p in self.policies:
            for rule in p.rules:
                if rule.matches_access(a.operation, a.obj):
                    action: Action = rule.action
                    if rule.require_where and a.operation in ("update", "delete") and not a.has_where:
                        action = "deny"
                    explicit.append((p, rule, action))
                    break
        if explicit:
            worst = max(SEVERITY[x[2]] for x in explicit)
            chosen = [x for x in explicit if SEVERITY[x[2]] == worst]
            p, rule, action = chosen[0]
            enforce = any(q.mode == "enforce" for q, _, _ in chosen)
            label = p.rule_label(rule)
            if action == "deny" and rule.action != "deny":
                reason = (f"{a.operation.upper()} without a WHERE clause on {display(a.obj)}: {label} requires one "
                          "(a WHERE that names no column, like WHERE true, does not count)")
                return _Verdict("deny", label, reason, enforce, hint="Add a WHERE clause that selects the rows.")
            if action == "deny":
                return _Verdict("deny", label, f"{what} is denied by {label}", enforce,
                                hint=f"Ask the owner of AccessPolicy {p.id} if you need this. {self._summary}")
            if action == "review":
                approval = p.approval
                who = ", ".join(str(r) for r in approval.reviewers) if approval else "a reviewer"
                return _Verdict("review", label, f"{what} needs approval by {who} ({label})", enforce,
                                approval=approval,
                                hint="pgwarden holds the statement until a reviewer approves it; "
                                     "retry once the ApprovalRequest is approved.")
            return _Verdict("allow", label, f"{what} is allowed by {label}")
        if (a.operation == "select" and a.obj is not None and a.obj[0] in CATALOG_SCHEMAS
                and a.obj not in SENSITIVE_CATALOG_RELATIONS
                and all(p.system_catalogs == "read" for p in self.policies)):
            return _Verdict("allow", "systemCatalogs", f"{what} is a system catalog read (systemCatalogs: read)")
        worst = max(SEVERITY[p.default_action] for p in self.policies)
        chosen_p = [p for p in self.policies if SEVERITY[p.default_action] == worst]
        p = chosen_p[0]
        enforce = any(q.mode == "enforce" for q in chosen_p)
        label = f"{p.id} defaultAction"
        if p.default_action == "allow":
            return _Verdict("allow", label, f"{what} is allowed by {label}")
        if p.default_action == "review":
            who = ", ".join(str(r) for r in p.approval.reviewers) if p.approval else "a reviewer"
            return _Verdict("review", label, f"{what} matches no rule and needs approval by {who} ({label})",
                            enforce, approval=p.approval,
                            hint="pgwarden holds the statement until a reviewer approves it.")
        ids = ", ".join(q.id for q in self.policies)
        return _Verdict("deny", label, f"{what} is not allowed by any rule of {ids} (defaultAction: deny)", enforce,
                        hint=f"{self._summary} Ask a policy owner to add a rule if you need more.")

    def _function(self, f: FunctionUse) -> _Verdict:
        if not self.policies:
            return self._no_policy(f"calling {f.display}")
        results = []
        for cand in f.candidates:
            results.append(self._function_candidate(f, cand))
        return max(results, key=lambda v: SEVERITY[v.action])

    def _function_candidate(self, f: FunctionUse, cand: tuple[str, str]) -> _Verdict:
        name = display(cand)
        explicit: list[tuple[AccessPolicy, Rule]] = []
        for p in self.policies:
            for rule in p.rules:
                if rule.matches_function(cand):
                    explicit.append((p, rule))
                    break
        if explicit:
            worst = max(SEVERITY[r.action] for _, r in explicit)
            chosen = [(p, r) for p, r in explicit if SEVERITY[r.action] == worst]
            p, rule = chosen[0]
            label = p.rule_label(rule)
            enforce = any(q.mode == "enforce" for q, _ in chosen)
            if rule.action == "allow":
                return _Verdict("allow", label, f"{name}() is allowed by {label}")
            if rule.action == "review":
                who = ", ".join(str(r) for r in p.approval.reviewers) if p.approval else "a reviewer"
                return _Verdict("review", label, f"calling {name}() needs approval by {who} ({label})", enforce,
                                approval=p.approval)
            return _Verdict("deny", label, f"calling {name}() is denied by {label}", enforce)
        listed = any(pat.matches(cand) for p in self.policies for pat in p.allowed_functions)
        why = fn.denied_unless_named(f.bare)
        if why and not listed:
            return _Verdict("deny", BUILTIN, f"{name}() {why}; a policy must name it in allowedFunctions",
                            hint="Ask a policy owner to list it in allowedFunctions if you need it.")
        if f.needs_timeout and self.limits.statement_timeout is None and not listed:
            return _Verdict("deny", BUILTIN, f"{name}() is allowed only under a limits.statementTimeout",
                            hint="Ask a policy owner to set limits.statementTimeout.")
        if f.builtin or listed:
            return _Verdict("allow", BUILTIN if f.builtin else "allowedFunctions", f"{name}() is allowed")
        return _Verdict("deny", BUILTIN, f"function {name}() is not on the allowlist of side-effect-free functions",
                        hint="Use built-in functions, or ask a policy owner to add it to allowedFunctions "
                             "(schema-qualified, e.g. public.order_total).")

    def _no_policy(self, what: str) -> _Verdict:
        return _Verdict("deny", "no policy", f"{what} is denied: {self._tried}",
                        hint="Ask an administrator to add one of your groups, your user or your service account "
                             "to the subjects of an AccessPolicy for this connection.")

    # -- assembling ----------------------------------------------------------------------------

    def _build(self, verdicts: list[_Verdict], effects: tuple[Effect, ...],
               accesses: list[tuple[str, str, str, str]], funcs: tuple[str, ...], count: int) -> Decision:
        if not self.policies and not verdicts:
            verdicts = [self._no_policy("the statement")] if count else []
        worst = max((SEVERITY[v.action] for v in verdicts), default=0)
        action = next(a for a, s in SEVERITY.items() if s == worst)
        deciding = [v for v in verdicts if v.action == action]
        reasons = tuple(dict.fromkeys(v.reason for v in verdicts if v.action != "allow"))
        used = {x[0] for x in accesses}
        ops = tuple(o for o in OPERATIONS if o in used) if used else ()
        tables = tuple(sorted({x[1] for x in accesses if x[1] != "-"}))
        common = dict(operations=ops, tables=tables, functions=funcs, limits=self.limits,
                      policies=tuple(p.id for p in self.policies), accesses=tuple(dict.fromkeys(accesses)),
                      session_effects=effects, statements=count)
        if action == "allow":
            rules = [v.rule for v in deciding if v.rule != BUILTIN]
            return Decision(action="allow", rule=rules[0] if rules else BUILTIN, message="allowed",
                            reasons=(), **common)  # type: ignore[arg-type]
        first = deciding[0]
        enforce = any(v.enforce for v in deciding)
        if action == "deny":
            message = f"pgwarden denied this statement: {first.reason}"
            if len(reasons) > 1:
                message += f" (and {len(reasons) - 1} more reason{'s' if len(reasons) > 2 else ''})"
            if count > 1:
                message += "; a multi-statement text is decided as a whole, so none of it ran"
            sqlstate = "42501"
        else:
            message = f"pgwarden needs approval for this statement: {first.reason}"
            sqlstate = "PW001"
        if not enforce:
            message += " [audit mode: allowed to run and logged]"
        approval = next((v.approval for v in deciding if v.approval is not None), None)
        return Decision(action=action, enforce=enforce, sqlstate=sqlstate, message=message,
                        hint=first.hint or "See `pgwarden policy explain` for the full decision.",
                        rule=first.rule, reasons=reasons, approval=approval, **common)  # type: ignore[arg-type]


def _allowed_summary(policies: tuple[AccessPolicy, ...]) -> str:
    """A short 'what you may do' line for hints, so an agent can rewrite instead of retrying."""
    allow: list[str] = []
    review: list[str] = []
    for p in policies:
        for r in p.rules:
            if r.functions is not None or r.action == "deny":
                continue
            ops = ", ".join(o for o in OPERATIONS if o in r.operations)
            tables = ", ".join(str(t) for t in r.tables) if r.tables else "any table"
            (allow if r.action == "allow" else review).append(f"{ops} on {tables}")
    parts = []
    if allow:
        parts.append("Allowed: " + "; ".join(allow) + ".")
    if review:
        parts.append("With approval: " + "; ".join(review) + ".")
    text = " ".join(parts) or "No operation is allowed for you on this connection."
    return text if len(text) < 400 else text[:397] + "…"


_ = ANY, Deallocate  # re-exported names used by callers' isinstance checks
