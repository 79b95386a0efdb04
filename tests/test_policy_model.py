"""AccessPolicy loading (located errors, never falling open), policy combination, audit mode, explain CLI."""

from __future__ import annotations

import json
import textwrap

import pytest
from test_policy_helpers import AGENTS_POLICY, agent, policy_set

from pgwarden import cli
from pgwarden.policy import SessionState
from pgwarden.resources import ResourceError

HEAD = """
apiVersion: pgwarden.dev/v1alpha1
kind: AccessPolicy
metadata: {name: p, namespace: ns}
spec:
  connectionRef: {name: shop}
  subjects: [{group: agents}]
"""


def load(extra: str):
    return policy_set(HEAD + textwrap.indent(textwrap.dedent(extra), "  "))


@pytest.mark.parametrize(
    ("spec", "field", "problem"),
    [
        ("rules: [{action: allow, operations: [select, drop], tables: [public.orders]}]",
         "spec.rules[0].operations[1]", "unknown operation 'drop'"),
        ("rules: [{action: allow, operations: [select], tables: [orders]}]",
         "spec.rules[0].tables[0]", "schema-qualified"),
        ("rules: [{action: allow, operations: [select], tables: [public.ord*]}]",
         "spec.rules[0].tables[0]", "must stand alone"),
        ("rules: [{action: allow, operations: [select], tables: ['*.orders']}]",
         "spec.rules[0].tables[0]", "wildcard schema"),
        ("rules: [{action: allow, operations: [select], tables: []}]", "spec.rules[0].tables", "must not be empty"),
        ("rules: [{action: permit, operations: [select]}]", "spec.rules[0].action", "not one of"),
        ("rules: [{action: allow}]", "spec.rules[0].operations", "is required"),
        ("rules: [{action: allow, operations: [delete], requirewhere: true}]", "spec.rules[0].requirewhere",
         "unknown field"),
        ("rules: [{action: allow, operations: [select], requireWhere: true}]", "spec.rules[0].requireWhere",
         "only applies"),
        ("rules: [{action: allow, operations: [select], functions: [public.f]}]", "spec.rules[0]", "either functions"),
        ("rules: [{action: review, operations: [delete]}]", "spec.approval.reviewers", "name who may approve"),
        ("limits: {statementTimeout: 15 minutes}", "spec.limits.statementTimeout", "not a duration"),
        ("limits: {maxRows: 0}", "spec.limits.maxRows", "at least 1"),
        ("limits: {maxrows: 10}", "spec.limits.maxrows", "unknown field"),
        ("approval: {reviewers: [{group: dba}], timeout: soon}", "spec.approval.timeout", "not a duration"),
        ("approval: {reviewers: [{group: dba}], mode: later}", "spec.approval.mode", "not one of"),
        ("defaultAction: allowed", "spec.defaultAction", "not one of"),
        ("mode: dry-run", "spec.mode", "not one of"),
        ("allowedFunctions: [order_total]", "spec.allowedFunctions[0]", "schema-qualified"),
        ("systemCatalogs: write", "spec.systemCatalogs", "not one of"),
        ("rulez: []", "spec.rulez", "unknown field"),
    ],
)
def test_policy_errors_name_document_and_field(spec, field, problem):
    with pytest.raises(ResourceError) as e:
        load(spec)
    assert e.value.field_path == field
    assert problem in str(e.value)
    assert "test.yaml document 1 (AccessPolicy ns/p)" in str(e.value)


def test_missing_subjects_and_connection_are_errors():
    with pytest.raises(ResourceError, match="spec.connectionRef"):
        policy_set(HEAD.replace("  connectionRef: {name: shop}\n", ""))
    with pytest.raises(ResourceError, match="spec.subjects"):
        policy_set(HEAD.replace("  subjects: [{group: agents}]\n", ""))


def test_duplicate_policies_are_an_error():
    with pytest.raises(ResourceError, match="also defined"):
        policy_set(HEAD + "---" + HEAD)


def test_no_matching_policy_denies_everything_and_says_what_was_tried():
    s = agent(groups=("strangers",))
    d = s.decide("SELECT 1", SessionState())
    assert d.action == "deny"
    assert "user:bot, group:strangers" in d.message and "shop/agents" in d.message
    assert "subjects" in d.hint
    other = policy_set().for_identity(s.identity, "billing")
    assert "no AccessPolicy refers to connection 'billing'" in other.decide("SELECT 1", SessionState()).message


SECOND = """
---
apiVersion: pgwarden.dev/v1alpha1
kind: AccessPolicy
metadata: {name: extra, namespace: shop}
spec:
  connectionRef: {name: shop}
  subjects: [{group: analysts}]
  rules:
    - {action: allow, operations: [select], tables: [public.customers, public.invoices]}
    - {action: allow, operations: [delete], tables: [public.orders]}
    - {action: allow, operations: [listen, notify]}
    - {action: allow, functions: [pg_catalog.pg_advisory_lock, pg_catalog.pg_advisory_unlock]}
    - {action: deny, functions: [pg_catalog.md5]}
  defaultAction: deny
  limits: {maxRows: 10}
"""


def test_policies_combine_deny_over_review_over_allow():
    both = agent(AGENTS_POLICY + SECOND, groups=("agents", "analysts"))
    decide = lambda sql: both.decide(sql, SessionState())  # noqa: E731
    assert decide("SELECT * FROM customers").action == "deny"  # explicit deny beats explicit allow
    assert decide("DELETE FROM orders WHERE id = 1").action == "review"  # review beats allow
    assert decide("SELECT * FROM invoices").action == "allow"  # one explicit allow beats the other's default
    assert decide("LISTEN ch").action == "allow"
    assert decide("SELECT pg_advisory_lock(1)").action == "allow"
    assert decide("SELECT md5('x')").action == "deny"
    assert decide("SELECT pg_read_file('x')").action == "deny"  # built-in guards ignore policies
    d = decide("SELECT * FROM orders")
    assert d.limits.max_rows == 10 and d.limits.statement_timeout == 30.0  # strictest of both
    assert d.policies == ("shop/agents", "shop/extra")


def test_allowing_a_user_schema_does_not_allow_catalog_functions_of_the_same_call():
    """`allowedFunctions: [public.*]` allows public functions, not pg_catalog ones reached unqualified."""
    s = agent(AGENTS_POLICY.replace("defaultAction: deny", "defaultAction: deny\n  allowedFunctions: ['public.*']"))
    assert s.decide("SELECT my_helper(1)", SessionState()).action == "allow"
    assert s.decide("SELECT public.my_helper(1)", SessionState()).action == "allow"
    assert s.decide("SELECT pg_stat_get_backend_activity(1)", SessionState()).action == "deny"
    assert s.decide("SELECT pg_future_function(1)", SessionState()).action == "deny"
    assert s.decide("SELECT public.pg_read_file('x')", SessionState()).action == "deny"


def test_pg_sleep_needs_a_statement_timeout():
    analysts = agent(AGENTS_POLICY + SECOND, groups=("analysts",))
    assert analysts.decide("SELECT pg_sleep(1)", SessionState()).action == "deny"
    assert agent().decide("SELECT pg_sleep(1)", SessionState()).action == "allow"


def test_audit_mode_lets_rule_outcomes_run_but_not_builtin_guards():
    audit = agent(AGENTS_POLICY.replace("defaultAction: deny", "defaultAction: deny\n  mode: audit"))
    d = audit.decide("SELECT * FROM customers", SessionState())
    assert d.action == "deny" and not d.enforce and d.forwarded and "audit mode" in d.message
    d = audit.decide("DELETE FROM orders WHERE id = 1", SessionState())
    assert d.action == "review" and not d.enforce
    for sql in ("SET ROLE postgres", "DO $$ begin end $$", "SELECT pg_read_file('x')", "SELEC 1",
                "SELECT unknown_function()"):
        d = audit.decide(sql, SessionState())
        assert d.action == "deny" and d.enforce, sql


def test_system_catalogs_deny_and_default_allow():
    no_catalogs = agent(AGENTS_POLICY.replace("defaultAction: deny", "defaultAction: deny\n  systemCatalogs: deny"))
    assert no_catalogs.decide("SELECT * FROM pg_class", SessionState()).action == "deny"
    permissive = agent(AGENTS_POLICY.replace("defaultAction: deny", "defaultAction: allow"))
    assert permissive.decide("SELECT * FROM invoices", SessionState()).action == "allow"
    assert permissive.decide("SELECT * FROM customers", SessionState()).action == "deny"
    # defaultAction allow still never allows what is not understood
    assert permissive.decide("SELECT evil()", SessionState()).action == "deny"
    assert permissive.decide("SELECT * FROM pg_authid", SessionState()).action == "deny"


def test_example_policy_loads(tmp_path):
    from pathlib import Path

    from pgwarden.policy import load_policies
    from pgwarden.resources import load_documents

    root = Path(__file__).resolve().parents[1]
    ps = load_policies(load_documents([root / "examples" / "access-policy.yaml"]))
    assert ps.connections == ("orders-prod",)


# -- pgwarden policy explain -------------------------------------------------------------------

def explain(tmp_path, capsys, *args: str, text: str = AGENTS_POLICY):
    cfg = tmp_path / "policy.yaml"
    cfg.write_text(text)
    rc = cli.main(["policy", "explain", "--config", str(cfg), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_explain_prints_the_decision_as_json(tmp_path, capsys):
    rc, out, _ = explain(tmp_path, capsys, "--group", "agents", "SELECT * FROM orders")
    j = json.loads(out)
    assert rc == 0 and j["action"] == "allow" and j["tables"] == ["public.orders"] and j["connection"] == "shop"
    rc, out, _ = explain(tmp_path, capsys, "--group", "agents", "DELETE FROM orders WHERE id = 1")
    assert rc == 3 and json.loads(out)["rule"] == "shop/agents rule 4 (order-changes)"
    rc, out, _ = explain(tmp_path, capsys, "--group", "agents", "SELECT 1; DROP TABLE orders")
    j = json.loads(out)
    assert rc == 1 and j["action"] == "deny" and j["sqlstate"] == "42501" and j["operations"] == ["ddl"]


def test_explain_with_user_and_service_account(tmp_path, capsys):
    text = AGENTS_POLICY.replace("subjects: [{group: agents}]",
                                 "subjects: [{user: alice}, {serviceAccount: agents/cursor}]")
    rc, out, _ = explain(tmp_path, capsys, "--user", "alice", "SELECT * FROM orders", text=text)
    assert rc == 0
    rc, out, _ = explain(tmp_path, capsys, "--service-account", "agents/cursor", "--connection", "shop",
                         "SELECT * FROM orders", text=text)
    assert rc == 0 and json.loads(out)["identity"]["serviceAccount"] == "agents/cursor"


def test_explain_config_errors_are_user_errors(tmp_path, capsys):
    rc, out, err = explain(tmp_path, capsys, "--group", "agents", "SELECT 1",
                           text=AGENTS_POLICY.replace("[select, update]", "[select, upsert]"))
    assert rc == 2 and out == ""
    assert "spec.rules[4].operations[1]" in err and "unknown operation 'upsert'" in err


def test_limits_max_denials_and_rate_parse_and_combine_to_the_strictest() -> None:
    from pgwarden.policy.model import DenialLimit, Limits

    a = Limits(max_denials=DenialLimit(5, 60, 300), max_statements_per_minute=100)
    b = Limits(max_denials=DenialLimit(3, 600, 60), max_statements_per_minute=None)
    c = a.combine(b)
    assert c.max_denials == DenialLimit(3, 600, 300) and c.max_statements_per_minute == 100
    assert Limits().combine(b).max_denials == DenialLimit(3, 600, 60)


def test_limits_max_affected_rows_combine_to_the_smallest() -> None:
    from pgwarden.policy.model import Limits

    assert Limits(max_affected_rows=100).combine(Limits(max_affected_rows=7)).max_affected_rows == 7
    assert Limits().combine(Limits(max_affected_rows=7)).max_affected_rows == 7
    assert Limits(max_affected_rows=7).to_json()["maxAffectedRows"] == 7


@pytest.mark.parametrize("limits, message", [
    ({"maxDenials": {"count": 0}}, "spec.limits.maxDenials.count"),
    ({"maxDenials": {"count": 3, "windw": "1m"}}, "windw"),
    ({"maxDenials": {"count": 3, "lockout": "0s"}}, "positive"),
    ({"maxStatementsPerMinute": 0}, "maxStatementsPerMinute"),
    ({"maxAffectedRows": 0}, "spec.limits.maxAffectedRows: must be at least 1"),
    ({"maxAffectedRows": "10"}, "spec.limits.maxAffectedRows: must be a int"),
])
def test_limits_that_cannot_work_are_refused_with_the_field(limits: dict, message: str) -> None:
    import yaml

    from pgwarden.policy import load_policies
    from pgwarden.resources import ResourceError, parse_documents

    doc = {"apiVersion": "pgwarden.dev/v1alpha1", "kind": "AccessPolicy", "metadata": {"name": "p"},
           "spec": {"connectionRef": {"name": "shop"}, "subjects": [{"group": "g"}], "rules": [], "limits": limits}}
    with pytest.raises(ResourceError, match=message):
        load_policies(parse_documents(yaml.safe_dump(doc)))
