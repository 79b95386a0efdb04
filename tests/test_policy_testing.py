"""The pure side of `pgwarden policy test`: replaying audit records and running policy cases.

Records are built with pgwarden.audit.records, the functions the proxy writes them with, and
shaped as proxy/gate.py shapes them (the policy summary, the refusal, the Bind phase).
"""

from __future__ import annotations

from typing import Any

import pytest

from pgwarden.audit import records
from pgwarden.policy import load_policies
from pgwarden.policy.testing import (
    Candidate,
    CaseFileError,
    fails,
    group_changes,
    parse_cases,
    replay,
    rule_matches,
    run_cases,
)
from pgwarden.policy.testing_cli import render_cases, render_replay
from pgwarden.resources import parse_documents
from pgwarden.subjects import Identity
from pgwarden.textsafe import Escaper

AGENT = Identity(subject="agent", groups=("ai-agents",), method="static")


def policy(rules: list[dict[str, Any]], *, mode: str = "enforce", default: str = "deny") -> str:
    import yaml

    return yaml.safe_dump(
        {
            "apiVersion": "pgwarden.dev/v1alpha1",
            "kind": "AccessPolicy",
            "metadata": {"name": "agents"},
            "spec": {
                "connectionRef": {"name": "shop"},
                "subjects": [{"group": "ai-agents"}],
                "rules": rules,
                "defaultAction": default,
                "mode": mode,
                "approval": {"reviewers": [{"group": "dba"}]},
            },
        }
    )


READ_ALL = [
    {
        "name": "read",
        "action": "allow",
        "operations": ["select"],
        "tables": ["public.orders", "public.customers"],
    }
]
READ_ORDERS = [{"name": "read", "action": "allow", "operations": ["select"], "tables": ["public.orders"]}]


def candidate(text: str) -> Candidate:
    return Candidate(load_policies(parse_documents(text)))


class Log:
    """Audit records as the gate writes them, numbered like its statement ids."""

    def __init__(self) -> None:
        self.recs: list[tuple[str, dict[str, Any]]] = []

    def info(self, session: str, identity: Identity = AGENT) -> records.SessionInfo:
        return records.SessionInfo(session, identity=identity, connection="default/shop")

    def add(self, rec: dict[str, Any]) -> None:
        self.recs.append((f"audit.jsonl:{len(self.recs) + 1}", rec))

    def stmt(
        self,
        session: str,
        stmt: int,
        sql: str,
        action: str,
        rule: str = "",
        *,
        refusal: tuple[str, str] | None = None,
        params: tuple[str | None, ...] | None = None,
        protocol: str = "simple",
        mode: str = "enforce",
        identity: Identity = AGENT,
        outcome_sqlstate: str | None = "",
    ) -> None:
        extra: dict[str, Any] = {"policy": {"operations": [], "tables": [], "mode": mode}}
        if refusal:
            extra["refusal"] = {"sqlstate": refusal[0], "message": refusal[1]}
        info = self.info(session, identity)
        self.add(
            records.statement(
                info,
                str(stmt),
                sql,
                decision=action,
                rule=rule,
                params=params,
                protocol=protocol,
                extra=extra,
            )
        )
        if outcome_sqlstate is not None:
            self.add(records.outcome(info, str(stmt), duration_ms=1, sqlstate=outcome_sqlstate))

    def bind(self, session: str, stmt: int, sql: str, params: tuple[str | None, ...]) -> None:
        self.add(
            records.statement(
                self.info(session),
                str(stmt),
                sql,
                decision="allow",
                protocol="extended",
                params=params,
                extra={"phase": "bind"},
            )
        )


DENIED = ("42501", "pgwarden denied this statement: select on public.customers is not allowed")


def test_a_narrowed_policy_turns_recorded_allows_into_new_denials() -> None:
    log = Log()
    log.stmt("s1", 1, "SELECT * FROM orders", "allow", "default/agents rule 1 (read)")
    log.stmt("s1", 2, "SELECT * FROM customers WHERE id = 1", "allow", "default/agents rule 1 (read)")
    log.stmt("s1", 3, "SELECT * FROM customers WHERE id = 2", "allow", "default/agents rule 1 (read)")
    results = replay(log.recs, candidate(policy(READ_ORDERS)))
    assert [r.category for r in results] == ["unchanged", "new-denial", "new-denial"]
    (group,) = group_changes(results)
    # texts that differ only in literals are one group
    assert (group.count, group.texts, group.old.rule, group.new.label()) == (
        2,
        2,
        "default/agents rule 1 (read)",
        "deny by default/agents defaultAction",
    )
    assert fails(results, "new-denials") and fails(results, "any") and not fails(results, "new-allows")


def test_the_recorded_policy_changes_nothing() -> None:
    log = Log()
    log.stmt("s1", 1, "SELECT * FROM orders", "allow", "default/agents rule 1 (read)")
    log.stmt(
        "s1",
        2,
        "DROP TABLE orders",
        "deny",
        "default/agents defaultAction",
        refusal=("42501", "pgwarden denied this statement: ddl"),
        outcome_sqlstate=None,
    )
    results = replay(log.recs, candidate(policy(READ_ORDERS)))
    assert [r.category for r in results] == ["unchanged", "unchanged"]
    assert not fails(results, "any") and group_changes(results) == []


def test_refusals_apart_from_the_policy_are_not_comparable() -> None:
    log = Log()
    log.stmt(
        "s1",
        1,
        "SELECT ssn FROM customers",
        "deny",
        "default/agents rule 1 (read)",
        refusal=("42501", "masking rule default/pii: ssn cannot be masked in this expression"),
    )
    log.stmt(
        "s1",
        2,
        "-- protocol Execute of portal 'p'",
        "deny",
        refusal=("42501", "pgwarden refuses to execute portal 'p': no Bind or DECLARE"),
    )
    results = replay(log.recs, candidate(policy(READ_ORDERS)))
    assert [r.category for r in results] == ["not-comparable", "not-comparable"]
    assert "masking rule default/pii" in results[0].not_comparable
    assert not fails(results, "any")


def test_audit_mode_denials_that_become_enforced_are_new_denials() -> None:
    log = Log()
    log.stmt(
        "s1", 1, "SELECT * FROM customers", "deny-audit-only", "default/agents defaultAction", mode="audit"
    )
    results = replay(log.recs, candidate(policy(READ_ORDERS)))
    assert results[0].category == "new-denial"
    assert (
        results[0].old is not None
        and results[0].old.label() == "deny (audit mode) by default/agents defaultAction"
    )


def test_new_allows_and_held_statements() -> None:
    log = Log()
    log.stmt("s1", 1, "SELECT * FROM customers", "deny", "default/agents defaultAction", refusal=DENIED)
    log.stmt("s1", 2, "DELETE FROM orders WHERE id = 1", "allow", "default/agents rule 2")
    rules = [*READ_ALL, {"action": "review", "operations": ["delete"], "tables": ["public.orders"]}]
    results = replay(log.recs, candidate(policy(rules)))
    assert [r.category for r in results] == ["new-allow", "stricter"]
    assert [g.category for g in group_changes(results)] == ["new-allow", "stricter"]
    assert fails(results, "new-allows") and fails(results, "new-denials")


def test_execute_is_decided_as_what_that_session_prepared() -> None:
    log = Log()
    log.stmt("s1", 1, "PREPARE c AS SELECT * FROM customers", "allow")
    log.stmt("s1", 2, "EXECUTE c", "allow", "default/agents rule 1 (read)")
    # another session's EXECUTE c finds nothing prepared: denied then, denied now
    log.stmt("s2", 1, "EXECUTE c", "deny", refusal=("42501", "pgwarden denied this statement: EXECUTE c: no"))
    # a PREPARE the server refused (outcome with an error) prepared nothing
    log.stmt("s3", 1, "PREPARE c AS SELECT * FROM orders", "allow", outcome_sqlstate="42P05")
    log.stmt("s3", 2, "EXECUTE c", "deny", refusal=("42501", "pgwarden denied this statement: EXECUTE c: no"))
    # DEALLOCATE removes it again
    log.stmt("s4", 1, "PREPARE c AS SELECT * FROM orders", "allow")
    log.stmt("s4", 2, "DEALLOCATE c", "allow")
    log.stmt("s4", 3, "EXECUTE c", "deny", refusal=("42501", "pgwarden denied this statement: EXECUTE c: no"))
    results = replay(log.recs, candidate(policy(READ_ORDERS)))
    by = {(r.session, r.stmt): r for r in results}
    assert by[("s1", "2")].category == "new-denial"
    assert by[("s1", "2")].new is not None and "public.customers" in by[("s1", "2")].new.reason
    assert by[("s2", "1")].category == "unchanged"
    assert by[("s3", "2")].category == "unchanged"
    assert by[("s4", "3")].category == "unchanged"


def test_an_execute_of_a_protocol_prepared_name_is_not_comparable() -> None:
    log = Log()
    log.stmt(
        "s1",
        1,
        "EXECUTE p\n-- pgwarden: p is prepared as:\n--   SELECT * FROM orders",
        "allow",
        "default/agents rule 1 (read)",
    )
    (r,) = replay(log.recs, candidate(policy(READ_ORDERS)))
    assert r.category == "not-comparable" and "extended protocol" in r.not_comparable


def test_bind_values_go_with_their_parse_and_are_not_decided_twice() -> None:
    log = Log()
    log.stmt(
        "s1",
        1,
        "SELECT * FROM customers WHERE id = $1",
        "allow",
        "default/agents rule 1 (read)",
        protocol="extended",
    )
    log.bind("s1", 1, "SELECT * FROM customers WHERE id = $1", ("7",))
    log.bind("s1", 1, "SELECT * FROM customers WHERE id = $1", ("8",))
    (r,) = replay(log.recs, candidate(policy(READ_ORDERS)))
    assert r.category == "new-denial" and r.params == (("7",), ("8",))
    (g,) = group_changes([r])
    assert g.params == (("7",), ("8",))


def test_a_long_text_is_recorded_whole_and_compared() -> None:
    log = Log()
    long = "SELECT * FROM orders WHERE id IN (" + ", ".join(str(i) for i in range(20000)) + ")"
    log.stmt("s1", 1, long, "allow", "default/agents rule 1 (read)")
    (r,) = replay(log.recs, candidate(policy(READ_ORDERS)))
    assert log.recs[0][1]["sql"] == long  # the audit keeps the full text (bounded by maxStatementBytes)
    assert r.category == "unchanged"


def test_a_text_refused_unread_for_its_size_is_not_comparable() -> None:
    log = Log()
    head = "SELECT * FROM orders WHERE id IN (1, 2, 3"
    log.stmt("s1", 1, head + " …[refused unread: 900,000 bytes in all]", "deny",
             refusal=("54000", "pgwarden refuses this 900,000-byte statement"))
    (r,) = replay(log.recs, candidate(policy(READ_ORDERS)))
    assert r.category == "not-comparable"


def test_a_parse_is_decided_as_a_prepared_statement() -> None:
    log = Log()
    log.stmt(
        "s1",
        1,
        "SELECT 1; SELECT 2",
        "deny",
        refusal=("42501", "pgwarden denied this statement: a prepared"),
        protocol="extended",
    )
    (r,) = replay(log.recs, candidate(policy(READ_ORDERS, default="allow")))
    assert r.category == "unchanged"


def test_a_connection_without_policy_follows_proxyconfig_default_action() -> None:
    log = Log()
    log.stmt("s1", 1, "SELECT * FROM orders", "allow")
    other = policy(READ_ORDERS).replace("name: shop", "name: other")
    results = replay(log.recs, Candidate(load_policies(parse_documents(other))))
    assert results[0].category == "new-denial"
    allow_all = Candidate(load_policies(parse_documents(other)), default_action="allow")
    assert replay(log.recs, allow_all)[0].category == "unchanged"


def test_agent_text_is_escaped_in_the_replay_report() -> None:
    log = Log()
    sneaky = "SELECT * FROM customers /* \x1b[2K\x1b[1A\u202e */"
    log.stmt(
        "s1",
        1,
        sneaky,
        "allow",
        "default/agents rule 1 (read)",
        params=("\x1b]8;;http://x\x07",),
        protocol="extended",
    )
    results = replay(log.recs, candidate(policy(READ_ORDERS)))
    safe = Escaper()
    text = "\n".join(render_replay(results, group_changes(results), [], safe))
    assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text
    assert "\\x1b[2K" in text and "\\u202e" in text
    assert safe.note() is not None


CASES = {
    "defaults": {"identity": {"user": "cursor", "groups": ["ai-agents"]}, "connection": "shop"},
    "cases": [
        {
            "name": "reads orders",
            "sql": "SELECT * FROM orders",
            "expect": "allow",
            "rule": "default/agents rule read",
        },
        {
            "name": "prepared",
            "setup": ["PREPARE q AS SELECT * FROM customers"],
            "sql": "EXECUTE q",
            "expect": "deny",
        },
        {"name": "wrong", "sql": "SELECT * FROM customers", "expect": "allow"},
        {
            "name": "stranger",
            "identity": {"user": "x"},
            "sql": "SELECT 1",
            "expect": "deny",
            "rule": "default/agents rule 1 (read)",
        },
    ],
}


def test_cases_report_expected_against_got() -> None:
    cases = parse_cases(CASES, lines=[3, 5, 8, 9])
    results = run_cases(cases, candidate(policy(READ_ORDERS)))
    assert [r.passed for r in results] == [True, False, False, False]
    # the setup PREPARE is itself denied under this policy: the case cannot run as written
    assert "setup statement 1 was not allowed" in results[1].failure
    assert results[2].failure == "the decision differs"
    assert results[3].failure == "the rule differs"
    lines = list(render_cases(results, "cases.yaml", Escaper()))
    i = lines.index("FAIL cases.yaml:8: wrong")
    assert lines[i + 1 : i + 5] == [
        "  statement: SELECT * FROM customers",
        "  identity:  user cursor; groups ai-agents on shop",
        "  - expected: allow",
        "  + got:      deny by default/agents defaultAction",
    ]
    assert lines[-1] == "FAILED: 4 case(s), 1 passed, 3 failed"


def test_setup_prepares_what_execute_runs() -> None:
    (case,) = parse_cases(
        {
            "cases": [
                {
                    "sql": "EXECUTE q",
                    "setup": "PREPARE q AS SELECT * FROM orders",
                    "identity": {"groups": ["ai-agents"]},
                    "expect": "allow",
                }
            ]
        },
        default_connection="shop",
    )
    (r,) = run_cases([case], candidate(policy(READ_ORDERS)))
    assert r.passed and r.got.rule == "default/agents rule 1 (read)"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"case": []}, "a mapping with a `cases:` list"),
        ({"cases": [{"sql": "SELECT 1"}]}, "case 1: `expect` must be allow, review or deny, got None"),
        ({"cases": [{"sql": "SELECT 1", "expect": "allow", "identty": {}}]}, "unknown key(s) identty"),
        (
            {"cases": [{"sql": "SELECT 1", "expect": "allow", "identity": {"serviceAccount": "nope"}}]},
            "identity.serviceAccount must be NAMESPACE/NAME",
        ),
        ({"cases": [{"sql": "SELECT 1", "expect": "allow"}]}, "`connection` is needed"),
    ],
)
def test_malformed_cases_name_the_case_and_the_field(doc: Any, message: str) -> None:
    with pytest.raises(CaseFileError, match=None) as e:
        parse_cases(doc, default_connection="" if "connection" in message else "shop")
    assert message in str(e.value)


def test_rules_match_by_label_or_by_name() -> None:
    assert rule_matches("ns/p rule 2 (read)", "ns/p rule 2 (read)")
    assert rule_matches("ns/p rule read", "ns/p rule 2 (read)")
    assert not rule_matches("ns/p rule 3 (read)", "ns/p rule 2 (read)")
    assert not rule_matches("ns/p rule write", "ns/p rule 2 (read)")
    assert not rule_matches("ns/p rule read", "ns/p defaultAction")
