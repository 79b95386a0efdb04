"""Session-dependent decisions: PREPARE / EXECUTE / DEALLOCATE, named Parse, search_path, caching."""

from __future__ import annotations

from test_policy_helpers import agent

from pgwarden.policy import SessionState


def run(subject, session, sql, **kw):
    """Decide and, as the proxy does, apply the effects when the text is forwarded."""
    d = subject.decide(sql, session, **kw)
    if d.forwarded:
        session.apply(d)
    return d


def test_execute_is_decided_as_the_prepared_statement():
    s, sess = agent(), SessionState()
    d = run(s, sess, "PREPARE del(int) AS DELETE FROM orders WHERE id = $1")
    assert d.action == "allow" and [e.describe() for e in d.session_effects] == ["prepare del"]
    assert "del" in sess.prepared
    d = s.decide("EXECUTE del(1)", sess)
    assert d.action == "review" and d.tables == ("public.orders",)
    assert run(s, sess, "DEALLOCATE del").action == "allow"
    d = s.decide("EXECUTE del(1)", sess)
    assert d.action == "deny" and "no statement of that name" in d.message


def test_prepare_of_a_denied_statement_is_denied_and_not_recorded():
    s, sess = agent(), SessionState()
    d = run(s, sess, "PREPARE leak AS SELECT * FROM customers")
    assert d.action == "deny" and sess.prepared == {}
    assert s.decide("EXECUTE leak", sess).action == "deny"


def test_prepare_and_execute_in_one_text():
    s = agent()
    assert s.decide("PREPARE p AS SELECT * FROM orders; EXECUTE p", SessionState()).action == "allow"
    d = s.decide("PREPARE p AS DELETE FROM orders WHERE id = 1; EXECUTE p", SessionState())
    assert d.action == "review"
    d = s.decide("PREPARE p AS SELECT 1; DEALLOCATE p; EXECUTE p", SessionState())
    assert d.action == "deny"


def test_a_name_cannot_be_prepared_twice_without_deallocate():
    """Otherwise a failed re-PREPARE on the server would leave the engine deciding the wrong body."""
    s, sess = agent(), SessionState()
    run(s, sess, "PREPARE p AS DELETE FROM orders WHERE id = $1")
    d = s.decide("PREPARE p AS SELECT 1", sess)
    assert d.action == "deny" and "DEALLOCATE p first" in d.message
    run(s, sess, "DEALLOCATE ALL")
    assert sess.prepared == {}
    assert s.decide("PREPARE p AS SELECT 1", sess).action == "allow"


def test_execute_parameters_are_checked():
    s, sess = agent(), SessionState()
    run(s, sess, "PREPARE p(text) AS SELECT * FROM orders WHERE status = $1")
    assert s.decide("EXECUTE p('new')", sess).action == "allow"
    assert s.decide("EXECUTE p(pg_read_file('/etc/passwd'))", sess).action == "deny"
    assert s.decide("EXECUTE p((SELECT email FROM customers LIMIT 1))", sess).action == "deny"


def test_explain_execute_and_create_table_as_execute():
    s, sess = agent(), SessionState()
    run(s, sess, "PREPARE p AS DELETE FROM orders WHERE id = 1")
    assert s.decide("EXPLAIN EXECUTE p", sess).action == "allow"
    assert s.decide("EXPLAIN ANALYZE EXECUTE p", sess).action == "review"
    assert s.decide("CREATE TABLE copy AS EXECUTE p", sess).action == "deny"


def test_named_parse_registers_the_statement_for_sql_execute():
    s, sess = agent(), SessionState()
    d = run(s, sess, "SELECT * FROM orders WHERE id = $1", prepare_as="s1")
    assert d.action == "allow" and "s1" in sess.prepared
    assert s.decide("EXECUTE s1(1)", sess).action == "allow"
    sess.forget("s1")
    assert s.decide("EXECUTE s1(1)", sess).action == "deny"
    assert s.decide("SELECT 1; SELECT 2", sess, prepare_as="s2").action == "deny"


def test_nothing_changes_until_the_proxy_applies_the_decision():
    s, sess = agent(), SessionState()
    s.decide("PREPARE p AS SELECT 1", sess)
    assert sess.prepared == {}


def test_unqualified_names_resolve_against_the_pinned_search_path():
    s = agent()
    d = s.decide("SELECT * FROM orders", SessionState(search_path=("app", "public")))
    # either schema could hold `orders`: both must be allowed, and app.orders is not
    assert d.action == "deny" and set(d.tables) == {"app.orders", "public.orders"}
    assert s.decide("SELECT * FROM public.orders", SessionState(search_path=("app", "public"))).action == "allow"
    # the cache is keyed by search_path too
    assert s.decide("SELECT * FROM orders", SessionState()).action == "allow"


def test_search_path_must_be_plain_schema_names():
    import pytest

    with pytest.raises(ValueError):
        SessionState(search_path=("$user", "public"))


def test_decisions_are_cached_per_text_but_not_when_session_dependent():
    s, sess = agent(), SessionState()
    a = s.decide("SELECT * FROM orders WHERE id = 1", sess)
    assert s.decide("SELECT * FROM orders WHERE id = 1", sess) is a
    assert s.decide("EXECUTE p", sess).action == "deny"
    run(s, sess, "PREPARE p AS SELECT 1")
    assert s.decide("EXECUTE p", sess).action == "allow"


def test_deny_and_review_errors_name_the_rule_and_what_to_do():
    s = agent()
    err = s.decide("SELECT * FROM customers", SessionState()).as_error()
    assert err.sqlstate == "42501" and "shop/agents rule 1 (no-pii)" in err.message
    assert "Allowed: select on public.orders" in err.hint
    err = s.decide("DELETE FROM orders WHERE id = 1", SessionState()).as_error()
    assert err.sqlstate == "PW001" and "group:dba" in err.message and "order-changes" in err.message
    err = s.decide("SELECT * FROM nowhere", SessionState()).as_error()
    assert "defaultAction" in err.message and "Ask a policy owner" in err.hint


def test_decision_json_carries_limits_and_approval():
    d = agent().decide("DELETE FROM orders WHERE id = 1", SessionState())
    j = d.to_json()
    assert j["limits"] == {"maxRows": 100, "statementTimeout": 30.0, "maxDenials": None, "maxStatementsPerMinute": None,
                           "maxAffectedRows": None}
    assert j["approval"]["reviewers"] == ["group:dba"] and j["approval"]["timeout"] == 600.0
    assert j["accesses"] == [{"operation": "delete", "object": "public.orders", "action": "review",
                              "rule": "shop/agents rule 4 (order-changes)"}]
