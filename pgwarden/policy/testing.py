"""Trying candidate policies before they bite: audit-log replay and policy unit cases.

Pure functions (no database, no files): the shell in `pgwarden.policy.testing_cli` reads the
configuration, the audit files and the cases file and hands their contents here.

Replay: every `statement` record of an audit log is decided again by the same engine the proxy
runs (SubjectPolicy.decide), under the identity and connection the record names and with the
session's prepared statements rebuilt from the PREPAREs that session ran before it. The decision
the record holds is compared with the new one. What the proxy refused before (or apart from)
the policy — a masking refusal, a protocol refusal, an engine failure — says nothing about the
policy and is reported as not comparable.

Cases: a YAML list of statements with the identity, connection and session setup they run
under and the decision (and optionally the rule) expected; each is decided the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pgwarden.policy.analysis import analyze
from pgwarden.policy.engine import Decision, SessionState, apply_effects
from pgwarden.policy.model import SEVERITY
from pgwarden.policy.policyset import PolicySet
from pgwarden.subjects import Identity

Action = Literal["allow", "review", "deny"]
FailOn = Literal["any", "new-denials", "new-allows"]
FAIL_ON: tuple[str, ...] = ("any", "new-denials", "new-allows")

# What each recorded `decision.action` says the policy decided (records.statement, proxy/gate.py):
# (policy action, enforced, forwarded to the server).
_RECORDED: dict[str, tuple[Action, bool, bool]] = {
    "allow": ("allow", True, True),
    "deny": ("deny", True, False),
    "review": ("review", True, False),  # held and refused (defer mode, no backend) or withdrawn
    "review-at-bind": ("review", True, True),  # a Parse: the human decides at each Bind
    "approved": ("review", True, True),
    "denied": ("review", True, False),
    "expired": ("review", True, False),
    "deny-audit-only": ("deny", False, True),
    "review-audit-only": ("review", False, True),
}
# The message every policy denial starts with (Decision._build); other 42501s came from elsewhere.
_POLICY_DENIAL = "pgwarden denied this statement"
# A name no SQL PREPARE can give without quoting: decides a Parse as a named one would be.
_PARSE_NAME = "pgwarden replay parse"
# A statement refused for its size is recorded with only its first KiB and this marker (the gate's
# refuse_unread); older logs clipped long texts with "…[N more chars]"
_CLIPPED = re.compile(r"(…\[\d+ more chars\]| …\[refused unread: [\d,]+ bytes in all\])\Z")


@dataclass(frozen=True)
class Outcome:
    """A decision reduced to what replay compares: the action, whether it is enforced, the rule."""

    action: Action
    enforce: bool = True
    rule: str = ""
    reason: str = ""

    @property
    def effect(self) -> Action:
        """What the agent experiences: audit-mode outcomes run like an allow."""
        return self.action if self.enforce else "allow"

    def label(self) -> str:
        mode = "" if self.enforce or self.action == "allow" else " (audit mode)"
        return f"{self.action}{mode}" + (f" by {self.rule}" if self.rule else "")

    def same_decision(self, other: Outcome) -> bool:
        return self.action == other.action and (self.enforce or self.action == "allow") == (
            other.enforce or other.action == "allow"
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action, "enforce": self.enforce, "rule": self.rule}
        if self.reason:
            out["reason"] = self.reason
        return out


def from_decision(d: Decision) -> Outcome:
    return Outcome(d.action, d.enforce, d.rule, "; ".join(d.reasons))


@dataclass(frozen=True)
class Candidate:
    """The candidate configuration as the proxy would run it.

    Like the proxy (proxy/hooks.py): a connection that no AccessPolicy names is governed by
    ProxyConfig.spec.defaultAction (`deny` unless the configuration says `allow`).
    """

    policies: PolicySet
    search_path: tuple[str, ...] = ("public",)
    default_action: str = "deny"

    def decide(
        self,
        identity: Identity,
        connection: str,
        sql: str,
        state: SessionState,
        prepare_as: str | None = None,
    ) -> Outcome | Decision:
        if connection not in self.policies.connections:
            rule = "ProxyConfig defaultAction"
            if self.default_action == "allow":
                return Outcome("allow", True, rule)
            return Outcome("deny", True, rule, f"no AccessPolicy covers connection {connection!r}")
        return self.policies.for_identity(identity, connection).decide(sql, state, prepare_as=prepare_as)


def _outcome(result: Outcome | Decision) -> Outcome:
    return result if isinstance(result, Outcome) else from_decision(result)


# -- replay -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replayed:
    """One recorded statement decided again."""

    session: str
    stmt: str
    where: str  # file:line of the record
    sql: str
    identity: Identity
    connection: str
    protocol: str
    params: tuple[tuple[str | None, ...], ...]  # every Bind's values recorded for it
    old: Outcome | None
    new: Outcome | None
    group_key: str
    not_comparable: str = ""  # why it could not be compared

    @property
    def category(self) -> str:
        if self.not_comparable or self.old is None or self.new is None:
            return "not-comparable"
        if self.old.same_decision(self.new):
            return "unchanged"
        o, n = SEVERITY[self.old.effect], SEVERITY[self.new.effect]
        if self.old.effect == "allow" and self.new.effect == "deny":
            return "new-denial"
        if self.old.effect != "allow" and self.new.effect == "allow":
            return "new-allow"
        if n > o:
            return "stricter"
        if n < o:
            return "looser"
        return "mode"  # the same effect for the agent, another action or mode behind it

    @property
    def direction(self) -> str:
        """`new-denials` for any change that refuses or holds what ran (or refuses what was held),
        `new-allows` for any change that lets through what was held or refused."""
        c = self.category
        if c in ("new-denial", "stricter"):
            return "new-denials"
        if c in ("new-allow", "looser"):
            return "new-allows"
        return "any" if c == "mode" else ""


CATEGORY_ORDER = ("new-denial", "new-allow", "stricter", "looser", "mode")
CATEGORY_TITLES = {
    "new-denial": "New denials (ran before, refused now)",
    "new-allow": "New allows (held or refused before, run now)",
    "stricter": "Stricter (now held for review, or refused instead of held)",
    "looser": "Looser (now held for review instead of refused)",
    "mode": "Same effect for the agent, another decision behind it (audit mode)",
}


def _identity(rec: Mapping[str, Any]) -> Identity | None:
    ident = rec.get("identity")
    if not isinstance(ident, dict) or not isinstance(ident.get("subject"), str):
        return None
    groups = ident.get("groups") or []
    return Identity(
        subject=ident["subject"],
        groups=tuple(str(g) for g in groups if isinstance(g, str)),
        issuer=str(ident.get("issuer") or ""),
        service_account=str(ident.get("serviceAccount") or ""),
        method=str(ident.get("method") or "static"),
    )


def connection_name(recorded: str) -> str:
    """Records name the connection NAMESPACE/NAME; policies refer to it by name."""
    return recorded.rsplit("/", 1)[-1]


def _recorded(rec: Mapping[str, Any]) -> tuple[Outcome | None, bool, str]:
    """(what the policy decided, whether it was forwarded, why it is not comparable)."""
    dec = rec.get("decision")
    if not isinstance(dec, dict) or dec.get("action") not in _RECORDED:
        return None, False, f"the record's decision {dec!r} is not one pgwarden writes"
    action, enforce, forwarded = _RECORDED[dec["action"]]
    raw_refusal = rec.get("refusal")
    refusal: Mapping[str, Any] = raw_refusal if isinstance(raw_refusal, dict) else {}
    message = str(refusal.get("message") or "")
    policy = rec.get("policy") if isinstance(rec.get("policy"), dict) else None
    rule = str(dec.get("rule") or "") or ("ProxyConfig defaultAction" if policy is None else "")
    reason = str(dec.get("reason") or "")
    if dec["action"] == "deny" and not message.startswith(_POLICY_DENIAL):
        why = message or "refused before the policy decided"
        return None, False, f"refused apart from the policy ({refusal.get('sqlstate') or '?'}: {why})"
    return Outcome(action, enforce, rule, reason), forwarded, ""


def _executed_names(sql: str, search_path: tuple[str, ...], server_version: int) -> list[str]:
    a = analyze(sql, search_path, server_version)
    return [ex.name for st in a.statements for ex in st.executes]


def _group_key(sql: str, search_path: tuple[str, ...], server_version: int) -> str:
    """Statements that differ only in literals share a group (the analysis' constant-blind key)."""
    blind = analyze(sql, search_path, server_version).blind
    return f"blind:{blind}" if blind else f"text:{sql}"


def replay(
    records: Iterable[tuple[str, Mapping[str, Any]]], candidate: Candidate, *, server_version: int = 0
) -> list[Replayed]:
    """Decide every recorded statement again under `candidate`.

    `records` are (file:line, record) in log order. Per audit session the replay keeps its own
    SessionState: a recorded statement that was forwarded and did not fail adds its PREPAREs and
    removes its DEALLOCATEs, as the server did. Bind records (`phase: bind`) carry the values
    an earlier Parse ran with: they are attached to it, not decided again.
    """
    recs = list(records)
    failed: set[tuple[str, str]] = set()
    for _, r in recs:
        if r.get("event") == "statement.outcome" and r.get("sqlstate"):
            failed.add((str(r.get("session")), str(r.get("stmt"))))
    sessions: dict[str, SessionState] = {}
    versions: dict[str, int] = {}
    out: list[Replayed] = []
    by_stmt: dict[tuple[str, str], int] = {}
    for where, r in recs:
        sid = str(r.get("session") or "")
        if r.get("event") == "session.start" and isinstance(r.get("serverVersion"), int):
            versions[sid] = r["serverVersion"]
        if r.get("event") != "statement" or not isinstance(r.get("sql"), str):
            continue
        stmt = str(r.get("stmt"))
        params = r.get("params")
        values = tuple(params) if isinstance(params, list) else None
        if r.get("phase") == "bind":
            i = by_stmt.get((sid, stmt))
            if i is not None and values is not None:
                out[i] = replace(out[i], params=(*out[i].params, values))
            continue
        version = versions.get(sid, server_version)
        state = sessions.setdefault(
            sid, SessionState(search_path=candidate.search_path, server_version=version)
        )
        sql = r["sql"]
        identity = _identity(r)
        conn = connection_name(str(r.get("connection") or ""))
        protocol = str(r.get("protocol") or "simple")
        old, forwarded, why = _recorded(r)
        key = _group_key(sql, candidate.search_path, version)
        new: Outcome | None = None
        if _CLIPPED.search(sql):
            why = (
                why or "the record holds only the beginning of this long text, so it cannot be decided again"
            )
        if identity is None:
            why = why or "the record names no identity"
        elif not conn:
            why = why or "the record names no connection"
        if not why and old is not None and old.action != "deny":
            missing = [
                n for n in _executed_names(sql, candidate.search_path, version) if n not in state.prepared
            ]
            if missing:
                why = (
                    f"EXECUTE {missing[0]}: the statement was prepared through the extended protocol "
                    "(Parse), whose name the audit log does not record, or before the log begins"
                )
        if not why and identity is not None:
            is_parse = protocol == "extended" and values is None
            try:
                new = _outcome(
                    candidate.decide(identity, conn, sql, state, prepare_as=_PARSE_NAME if is_parse else None)
                )
            except Exception as e:  # the engine failing on a record is reported, not fatal
                why = f"the policy engine failed on it ({type(e).__name__}: {e})"
        if forwarded and (sid, stmt) not in failed:
            _apply_recorded(state, sql, candidate.search_path, version)
        by_stmt[(sid, stmt)] = len(out)
        out.append(
            Replayed(
                session=sid,
                stmt=stmt,
                where=where,
                sql=sql,
                identity=identity or Identity(subject="?"),
                connection=conn,
                protocol=protocol,
                params=(values,) if values is not None else (),
                old=old,
                new=new,
                group_key=key,
                not_comparable=why,
            )
        )
    return out


def _apply_recorded(state: SessionState, sql: str, search_path: tuple[str, ...], server_version: int) -> None:
    """The PREPARE / DEALLOCATE / DISCARD effects of a text the server ran."""
    a = analyze(sql, search_path, server_version)
    for st in a.statements:
        apply_effects(state.prepared, st.effects)


@dataclass(frozen=True)
class Group:
    category: str
    old: Outcome
    new: Outcome
    example: Replayed
    count: int
    texts: int
    subjects: tuple[str, ...]
    params: tuple[tuple[str | None, ...], ...]

    def to_json(self) -> dict[str, Any]:
        ex = self.example
        return {
            "category": self.category,
            "count": self.count,
            "distinctTexts": self.texts,
            "old": self.old.to_json(),
            "new": self.new.to_json(),
            "example": {
                "sql": ex.sql,
                "session": ex.session,
                "stmt": ex.stmt,
                "where": ex.where,
                "identity": ex.identity.as_dict(),
                "connection": ex.connection,
            },
            "subjects": list(self.subjects),
            "params": [list(p) for p in self.params],
        }


def group_changes(results: Sequence[Replayed], max_params: int = 5) -> list[Group]:
    """Changed statements grouped by category, old and new decision (with rules) and shape.

    New denials first, then new allows, then the other changes; within a category the biggest
    groups first."""
    buckets: dict[tuple[str, Outcome, Outcome, str], list[Replayed]] = {}
    for r in results:
        c = r.category
        if c in ("unchanged", "not-comparable"):
            continue
        assert r.old is not None and r.new is not None
        k = (c, _no_reason(r.old), _no_reason(r.new), r.group_key)
        buckets.setdefault(k, []).append(r)
    groups = []
    for (c, old, new, _), rs in buckets.items():
        params = tuple(p for r in rs for p in r.params)[:max_params]
        groups.append(
            Group(
                c,
                rs[0].old or old,
                rs[0].new or new,
                rs[0],
                len(rs),
                len({r.sql for r in rs}),
                tuple(sorted({r.identity.subject for r in rs})),
                params,
            )
        )
    # stable: equal groups stay in log order (of their first statement)
    groups.sort(key=lambda g: (CATEGORY_ORDER.index(g.category), -g.count))
    return groups


def _no_reason(o: Outcome) -> Outcome:
    return Outcome(o.action, o.enforce, o.rule)


def counts(results: Sequence[Replayed]) -> dict[str, int]:
    out = {c: 0 for c in (*CATEGORY_ORDER, "unchanged", "not-comparable")}
    for r in results:
        out[r.category] += 1
    out["replayed"] = len(results)
    return out


def fails(results: Sequence[Replayed], fail_on: str) -> bool:
    """Exit status 1 when any change goes in the direction `fail_on` names (`any`: every change)."""
    for r in results:
        d = r.direction
        if d and (fail_on == "any" or d == fail_on):
            return True
    return False


# -- unit cases -------------------------------------------------------------------------------


class CaseFileError(ValueError):
    """The cases file is malformed; the message names the case and field."""


@dataclass(frozen=True)
class Case:
    name: str
    sql: str
    identity: Identity
    connection: str
    expect: Action
    rule: str | None = None
    setup: tuple[str, ...] = ()
    server_version: int = 0
    where: str = ""


@dataclass(frozen=True)
class CaseResult:
    case: Case
    got: Outcome
    failure: str = ""  # empty: passed

    @property
    def passed(self) -> bool:
        return not self.failure

    def to_json(self) -> dict[str, Any]:
        c = self.case
        return {
            "name": c.name,
            "where": c.where,
            "passed": self.passed,
            "sql": c.sql,
            "identity": c.identity.as_dict(),
            "connection": c.connection,
            "expected": {"action": c.expect, "rule": c.rule},
            "got": self.got.to_json(),
            **({"failure": self.failure} if self.failure else {}),
        }


_CASE_KEYS = {"name", "sql", "identity", "connection", "setup", "expect", "rule", "serverVersion"}
_IDENTITY_KEYS = {"user", "groups", "serviceAccount"}


def parse_cases(
    doc: Any, *, default_connection: str = "", default_server_version: int = 0, lines: Sequence[int] = ()
) -> list[Case]:
    """The cases file's content (as loaded from YAML) into Cases; CaseFileError names what is wrong.

    `lines` are the 1-based line numbers of the cases, for reports."""
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
        raise CaseFileError(
            "a cases file is a mapping with a `cases:` list (see docs/policy.md, Testing policies)"
        )
    unknown = set(doc) - {"cases", "defaults"}
    if unknown:
        raise CaseFileError(
            f"unknown top-level key(s) {', '.join(sorted(unknown))}; expected cases and defaults"
        )
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - (_CASE_KEYS - {"name", "sql", "expect", "rule"}):
        raise CaseFileError("defaults may set identity, connection, setup and serverVersion")
    out = []
    for i, raw in enumerate(doc["cases"]):
        where = str(lines[i]) if i < len(lines) else f"case {i + 1}"
        if not isinstance(raw, dict):
            raise CaseFileError(f"{where}: a case is a mapping with sql and expect")
        c = {**defaults, **raw}
        at = f"line {where}" if i < len(lines) else where
        label = f"{at} ({c['name']})" if isinstance(c.get("name"), str) else at
        bad = set(c) - _CASE_KEYS
        if bad:
            raise CaseFileError(
                f"{label}: unknown key(s) {', '.join(sorted(bad))}; "
                f"a case has {', '.join(sorted(_CASE_KEYS))}"
            )
        sql = c.get("sql")
        if not isinstance(sql, str) or not sql.strip():
            raise CaseFileError(f"{label}: `sql` must be the statement text")
        expect = c.get("expect")
        if expect not in SEVERITY:
            raise CaseFileError(f"{label}: `expect` must be allow, review or deny, got {expect!r}")
        rule = c.get("rule")
        if rule is not None and not isinstance(rule, str):
            raise CaseFileError(f'{label}: `rule` must be a string such as "default/agents rule 1"')
        ident = c.get("identity") or {}
        if not isinstance(ident, dict) or set(ident) - _IDENTITY_KEYS:
            raise CaseFileError(f"{label}: `identity` may set {', '.join(sorted(_IDENTITY_KEYS))}")
        groups = ident.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise CaseFileError(f"{label}: identity.groups must be a list of group names")
        sa = ident.get("serviceAccount") or ""
        if not isinstance(sa, str) or (sa and sa.count("/") != 1):
            raise CaseFileError(f"{label}: identity.serviceAccount must be NAMESPACE/NAME, got {sa!r}")
        user = ident.get("user", "policy-test")
        if not isinstance(user, str):
            raise CaseFileError(f"{label}: identity.user must be a string")
        setup = c.get("setup") or []
        if isinstance(setup, str):
            setup = [setup]
        if not isinstance(setup, list) or not all(isinstance(s, str) for s in setup):
            raise CaseFileError(f"{label}: `setup` must be a list of statements run before `sql`")
        conn = c.get("connection") or default_connection
        if not isinstance(conn, str) or not conn:
            raise CaseFileError(
                f"{label}: `connection` is needed: the configuration names several connections"
            )
        version = c.get("serverVersion", default_server_version)
        if not isinstance(version, int) or isinstance(version, bool):
            raise CaseFileError(f"{label}: `serverVersion` must be a major version such as 16")
        given = c.get("name")
        name = given if isinstance(given, str) else sql.strip().splitlines()[0][:60]
        out.append(
            Case(
                name=name,
                sql=sql,
                identity=Identity(
                    subject=user, groups=tuple(groups), service_account=sa, method="policy-test"
                ),
                connection=conn,
                expect=expect,
                rule=rule,
                setup=tuple(setup),
                server_version=version,
                where=where,
            )
        )
    return out


def run_case(case: Case, candidate: Candidate) -> CaseResult:
    """Decide the setup statements in order (each must be allowed: the proxy would not run it
    otherwise), recording their PREPAREs, then the case's statement."""
    state = SessionState(search_path=candidate.search_path, server_version=case.server_version)
    for i, text in enumerate(case.setup, 1):
        result = candidate.decide(case.identity, case.connection, text, state)
        o = _outcome(result)
        if o.effect != "allow":
            return CaseResult(
                case,
                o,
                f"setup statement {i} was not allowed ({o.label()}), so the case could not run as written",
            )
        if isinstance(result, Decision):
            state.apply(result)
    got = _outcome(candidate.decide(case.identity, case.connection, case.sql, state))
    wrong_action = got.action != case.expect
    wrong_rule = case.rule is not None and not rule_matches(case.rule, got.rule)
    if wrong_action and wrong_rule:
        return CaseResult(case, got, "the decision and the rule differ")
    if wrong_action or wrong_rule:
        return CaseResult(case, got, f"the {'decision' if wrong_action else 'rule'} differs")
    return CaseResult(case, got)


_NAMED_RULE = re.compile(r" rule \d+ \((?P<name>.+)\)$")


def rule_matches(expected: str, got: str) -> bool:
    """`expected` is the rule label as decisions print it (`ns/policy rule 2 (read-shop)`), or with
    a named rule's name in place of its position (`ns/policy rule read-shop`), which survives
    rules being inserted above it."""
    if expected == got:
        return True
    m = _NAMED_RULE.search(got)
    return m is not None and expected == got[: m.start()] + f" rule {m.group('name')}"


def run_cases(cases: Sequence[Case], candidate: Candidate) -> list[CaseResult]:
    return [run_case(c, candidate) for c in cases]
