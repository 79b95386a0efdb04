"""A parse tree the parser never makes (a child it always fills in is missing) is refused, not crashed
on and not analysed as harmless.

pglast types every child of a node as optional. A tree that lacks one (a newer pglast, a node the
analysis was not written for) is one the masking analysis cannot vouch for: the planner refuses the
statement with 42501, as the proxy refuses anything it does not understand, instead of raising an
unexpected error or treating the missing child as empty. The trees are built by hand, because the
parser never leaves these children empty; the planner is handed them in place of the parser's."""

import pytest
from masking_helpers import masking, shop_catalog
from pglast import ast, enums

from pgwarden.masking import subject

CAT = shop_catalog()


def customers(*targets: ast.Node, **select: object) -> ast.SelectStmt:
    return ast.SelectStmt(
        targetList=tuple(ast.ResTarget(val=t) for t in targets),
        fromClause=(ast.RangeVar(relname="customers", inh=True),),
        op=enums.SetOperation.SETOP_NONE,
        **select,
    )


def email() -> ast.ColumnRef:
    return ast.ColumnRef(fields=(ast.String(sval="email"),))


@pytest.mark.parametrize(
    "sql, tree, missing",
    [
        ("SELECT email FROM customers", customers(ast.ColumnRef(fields=None)), "column name"),
        (
            "SELECT lower(email) FROM customers",
            customers(ast.FuncCall(funcname=None, args=(email(),))),
            "function name",
        ),
        (
            "SELECT email FROM customers",
            ast.SelectStmt(
                targetList=(ast.ResTarget(val=email()),),
                fromClause=(ast.RangeVar(relname=None, inh=True),),
                op=enums.SetOperation.SETOP_NONE,
            ),
            "relation name",
        ),
        (
            "SELECT email FROM customers UNION ALL SELECT email FROM customers",
            ast.SelectStmt(op=enums.SetOperation.SETOP_UNION, all=True, larg=None, rarg=customers(email())),
            "left side of a set operation",
        ),
        (
            "SELECT email FROM customers ORDER BY 1",
            customers(email(), sortClause=(ast.SortBy(node=ast.A_Const(val=ast.Integer(ival=None))),)),
            "integer value",
        ),
    ],
)
def test_a_tree_missing_a_child_is_refused(monkeypatch, sql, tree, missing):
    monkeypatch.setattr(subject, "parse_sql", lambda text: (ast.RawStmt(stmt=tree),))
    plan = masking().plan(sql, CAT)  # a fresh SubjectMasking: nothing from its plan cache
    assert plan.error is not None, "a tree the analysis cannot vouch for was planned"
    assert plan.error.sqlstate == "42501"
    assert plan.error.message == f"masking: the statement's parse tree has no {missing}: not analysed"
    assert plan.error.hint
    assert plan.results == ()  # nothing to forward: the proxy answers with the error


def test_the_same_statements_parsed_for_real_are_planned():
    """The refusals above come from the missing child, not from the statements."""
    sm = masking(allow=True)
    for sql in (
        "SELECT email FROM customers",
        "SELECT lower(email) FROM customers",
        "SELECT email FROM customers UNION ALL SELECT email FROM customers",
        "SELECT email FROM customers ORDER BY 1",
    ):
        plan = sm.plan(sql, CAT)
        assert plan.error is None, (sql, plan.error)
