"""The constant-blind cache: statements that differ only in literals share one analysis and
decision — but never when the decision read a literal, and never across different names."""

from __future__ import annotations

import pytest

from pgwarden.policy import SessionState, load_policies
from pgwarden.policy.analysis import analyze
from pgwarden.resources import parse_documents
from pgwarden.subjects import Identity

POLICY = """
apiVersion: pgwarden.dev/v1alpha1
kind: AccessPolicy
metadata: {name: agents}
spec:
  connectionRef: {name: shop}
  subjects: [{group: ai-agents}]
  rules:
    - {action: allow, operations: [select], tables: [public.orders]}
    - {action: allow, operations: [update], tables: [public.order_seq]}
"""


@pytest.fixture
def decide():
    subject = load_policies(parse_documents(POLICY)).for_identity(Identity("a", ("ai-agents",)), "shop")
    state = SessionState()
    return lambda sql: subject.decide(sql, state)


def test_literals_share_the_analysis(decide) -> None:
    a = analyze("SELECT total_cents FROM orders WHERE id = 1")
    b = analyze("SELECT total_cents FROM orders WHERE id = 123456")
    assert a is b
    assert decide("SELECT total_cents FROM orders WHERE id = 7").action == "allow"


@pytest.mark.parametrize(
    ("allowed", "denied"),
    [
        # a literal that names something is read by the engine: no sharing
        ("SELECT set_config('application_name', 'x', false)", "SELECT set_config('role', 'postgres', false)"),
        ("SELECT nextval('order_seq')", "SELECT nextval('customers_id_seq')"),
        # names are part of the key (libpg_query's fingerprint would ignore the CTE name)
        ("WITH customers AS (SELECT 1) SELECT * FROM customers", "WITH x AS (SELECT 1) SELECT * FROM customers"),
        ("SELECT * FROM orders o", "SELECT * FROM customers o"),
    ],
)
def test_what_the_decision_depends_on_is_never_blinded(decide, allowed: str, denied: str) -> None:
    assert decide(allowed).action == "allow"  # cached first
    assert decide(denied).action == "deny"


def test_a_literal_that_looks_like_tree_json_is_blanked_whole(decide) -> None:
    sql = """SELECT id FROM orders WHERE status = 'x"},"RangeVar":{"relname":"customers'"""
    assert decide(sql).action == "allow"
    assert decide("SELECT id FROM orders WHERE status = 'y'").action == "allow"
    assert analyze(sql) is analyze("SELECT id FROM orders WHERE status = 'y'")
