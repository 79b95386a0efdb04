"""Masking plans: cached by the parse tree with literals blanked — but never when the plan read
a literal's value (ORDER BY 2 names a column), and never across different names."""

from __future__ import annotations

import pytest
from masking_helpers import masking, shop_catalog

from pgwarden.policy.analysis import analyze

CATALOG = shop_catalog()


def plan(m, sql: str):  # type: ignore[no-untyped-def]
    return m.plan(sql, CATALOG, ("public",), blind=analyze(sql).blind)


def actions(p) -> list[str | None]:  # type: ignore[no-untyped-def]
    return [c.action for c in p.results[0].columns]


def test_texts_that_differ_only_in_literals_share_one_plan() -> None:
    m = masking()
    a = plan(m, "SELECT id, ssn FROM customers WHERE id = 1")
    b = plan(m, "SELECT id, ssn FROM customers WHERE id = 98765")
    assert a is b and actions(b) == [None, "redact"]


def test_a_plan_that_read_a_literal_is_not_shared() -> None:
    m = masking()
    by_ssn = plan(m, "SELECT name, ssn FROM customers ORDER BY 2 LIMIT 1")
    by_name = plan(m, "SELECT name, ssn FROM customers ORDER BY 1 LIMIT 1")
    assert by_ssn is not by_name
    # ordering by the masked column is a predicate on it; by the clear one it is not
    assert by_ssn.error is not None and by_name.error is None


def test_different_names_never_share() -> None:
    m = masking()
    clear = plan(m, "SELECT id, name FROM customers WHERE id = 1")
    hidden = plan(m, "SELECT id, ssn FROM customers WHERE id = 2")
    assert clear is not hidden and actions(clear) == [None, None] and actions(hidden) == [None, "redact"]


def test_a_refusal_is_never_turned_into_a_cached_pass() -> None:
    m = masking()
    assert plan(m, "SELECT id FROM customers WHERE ssn = '123-45-6789'").error is not None
    assert plan(m, "SELECT id FROM customers WHERE ssn = '000-00-0000'").error is not None
    assert plan(m, "SELECT id FROM customers WHERE id = 1").error is None


def test_system_columns_are_clear_but_never_a_route_to_a_masked_value() -> None:
    m = masking()
    joined = plan(m, "SELECT c.tableoid, c.ctid, c.xmin, c.id FROM customers c JOIN orders o ON o.tableoid = c.tableoid")
    assert joined.error is None and actions(joined) == [None, None, None, None]
    # a subquery column that happens to be called ctid is that column, masked as such
    aliased = plan(m, "SELECT s.ctid FROM (SELECT ssn AS ctid FROM customers) s")
    assert aliased.error is None and actions(aliased) == ["redact"]


@pytest.mark.parametrize("sql", [
    "SELECT ssn, min(id) FROM customers GROUP BY GROUPING SETS ((1))",
    "SELECT ssn, min(id) FROM customers GROUP BY CUBE(1)",
    "SELECT id, ssn FROM customers GROUP BY ROLLUP(2), 1",
    "SELECT ssn, id FROM customers GROUP BY GROUPING SETS ((1, 2), ())",
])
def test_grouping_sets_by_position_group_on_the_masked_column(sql: str) -> None:
    # grouping by a masked value tells duplicates apart: a predicate on it (allowInPredicates: false)
    assert plan(masking(), sql).error is not None


def test_grouping_sets_by_position_on_clear_columns_pass_and_are_not_shared() -> None:
    m = masking()
    clear = plan(m, "SELECT id, ssn FROM customers GROUP BY ROLLUP(1), 2")
    hidden = plan(m, "SELECT id, ssn FROM customers GROUP BY ROLLUP(2), 1")
    assert hidden.error is not None and clear is not hidden
