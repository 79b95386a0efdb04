"""The policy engine knows which names are pg_catalog's on the server's own release.

PostgreSQL searches pg_catalog before the search_path, but each release adds names: on 15 an
unqualified `uuidv7()` runs whatever `uuidv7` the search_path holds, on 18 the catalog's. The
proxy reads the server's version at login (its `server_version`) and decides with that release's
lists. The live tests run on whichever server the suite was started with (`--pg-version`).
"""

from __future__ import annotations

import psycopg
import pytest
import yaml
from test_policy_helpers import AGENTS_POLICY, agent

from pgwarden.policy import SessionState
from pgwarden.policy.catalog_names import (
    GRAMMAR_VERSION,
    catalog_functions,
    catalog_relations,
    known_version,
)
from pgwarden.policy.functions import BUILTIN_FUNCTIONS

POLICY_DOC = yaml.safe_load(
    AGENTS_POLICY.replace("subjects: [{group: agents}]", "subjects: [{group: ai-agents}]")
)
# built-ins the engine vouches for, by the release that added them to pg_catalog
NEW_BUILTINS = {16: "any_value(1)", 17: "to_bin(5)", 18: "uuidv7()"}


def _server_major(pg) -> int:
    return int(pg.psql("SHOW server_version_num").strip()) // 10000


# -- the lists are the server's -------------------------------------------------------------------


def test_the_catalog_function_names_are_the_servers(pg) -> None:
    version = _server_major(pg)
    names = pg.psql("SELECT DISTINCT proname FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace")
    assert catalog_functions(version) == frozenset(names.split()), (
        f"regenerate the lists for PostgreSQL {version}"
    )


def test_the_catalog_relation_names_are_the_servers(pg) -> None:
    version = _server_major(pg)
    names = pg.psql(
        "SELECT relname FROM pg_class WHERE relnamespace = 'pg_catalog'::regnamespace "
        "AND relkind IN ('r', 'v', 'm', 'p', 'f')"
    )
    assert catalog_relations(version) == frozenset(names.split()), (
        f"regenerate the lists for PostgreSQL {version}"
    )


def test_every_vouched_builtin_exists_on_the_newest_release() -> None:
    """A typo (or a name from a release pgwarden does not know) in the list would be vouched for."""
    not_functions = {"json", "jsonb", "json_scalar", "json_serialize"}  # SQL syntax the parser names so
    assert BUILTIN_FUNCTIONS - catalog_functions() == not_functions


def test_unknown_and_newer_servers_are_decided_as_the_newest_release() -> None:
    assert known_version(0) == known_version(19) == 18
    assert known_version(14) == 15


# -- decisions per release ---------------------------------------------------------------------------


@pytest.mark.parametrize("added", sorted(NEW_BUILTINS))
@pytest.mark.parametrize("server", [15, 16, 17, 18])
def test_a_builtin_is_vouched_for_only_where_the_catalog_has_it(server: int, added: int) -> None:
    decision = agent().decide(f"SELECT {NEW_BUILTINS[added]}", SessionState(server_version=server))
    if server >= added:
        assert decision.action == "allow", decision.message
    else:  # the name means a function on the search_path, which no rule allows
        name = NEW_BUILTINS[added].split("(")[0]
        assert decision.action == "deny" and f"public.{name}" in decision.message, decision.message


@pytest.mark.parametrize(("server", "reads_public_too"), [(15, True), (16, False), (18, False)])
def test_a_newer_catalog_view_on_an_older_server_may_be_a_table_of_the_search_path(
    server: int, reads_public_too: bool
) -> None:
    """pg_stat_io is pg_catalog's from 16 on; on 15 `FROM pg_stat_io` finds public.pg_stat_io."""
    decision = agent().decide("SELECT * FROM pg_stat_io", SessionState(server_version=server))
    assert ("public.pg_stat_io" in decision.message) is reads_public_too, decision.message
    assert (decision.action == "deny") is reads_public_too


def test_syntax_newer_than_the_parser_fails_closed_naming_the_construct_and_the_server() -> None:
    newer = GRAMMAR_VERSION + 1
    sql = "UPDATE orders FOR PORTION OF valid_at FROM '2020-01-01' TO '2021-01-01' SET status = 'x' WHERE id = 1"
    decision = agent().decide(sql, SessionState(server_version=newer))
    assert decision.action == "deny" and decision.sqlstate == "42501"
    assert "FOR PORTION OF" in decision.message
    assert f"the server is PostgreSQL {newer}" in decision.message
    assert f"PostgreSQL {GRAMMAR_VERSION}'s grammar" in decision.message
    # on a server of the parser's own release the same text is simply not SQL
    same = agent().decide(sql, SessionState(server_version=GRAMMAR_VERSION))
    assert same.action == "deny" and "does not parse" in same.message and "server is" not in same.message


def test_unknown_newer_syntax_still_names_the_token_and_the_server() -> None:
    newer = GRAMMAR_VERSION + 1
    decision = agent().decide("FROBNICATE TABLE orders", SessionState(server_version=newer))
    assert decision.action == "deny"
    assert f"syntax newer than PostgreSQL {GRAMMAR_VERSION}" in decision.message
    assert '"FROBNICATE"' in decision.message and f"PostgreSQL {newer}" in decision.message


# -- through the proxy: the version comes from the login ------------------------------------------------


@pytest.fixture
def planted_uuidv7(pg):
    """A function on the search_path named like 18's built-in, which records that it ran."""
    pg.psql(
        "CREATE TABLE public.uuidv7_calls (at timestamptz);"
        "CREATE FUNCTION public.uuidv7() RETURNS uuid LANGUAGE sql AS "
        "$$ INSERT INTO public.uuidv7_calls VALUES (now()); SELECT gen_random_uuid() $$;"
        "GRANT INSERT ON public.uuidv7_calls TO app; GRANT EXECUTE ON FUNCTION public.uuidv7() TO app",
        dbname="shop",
    )
    yield
    pg.psql("DROP FUNCTION public.uuidv7(); DROP TABLE public.uuidv7_calls", dbname="shop")


def test_the_proxy_decides_with_the_servers_release(pg, make_proxy, planted_uuidv7) -> None:
    version = _server_major(pg)
    proxy = make_proxy(extra=[POLICY_DOC])
    mark = pg.log_position()
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        assert int(conn.info.parameter_status("server_version").split(".")[0]) == version
        if version >= 18:  # pg_catalog.uuidv7: a built-in, allowed; the planted function never runs
            value = conn.execute("SELECT uuidv7()").fetchone()[0]
            assert value.version == 7
        else:  # the planted function is what would run: no rule allows it
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute("SELECT uuidv7()")
            assert "public.uuidv7" in str(e.value)
            assert "uuidv7" not in pg.log_since(mark)  # refused before the server
    assert pg.psql("SELECT count(*) FROM public.uuidv7_calls", dbname="shop").strip() == "0"


def test_policy_explain_decides_for_a_given_server_version(tmp_path, capsys) -> None:
    import json

    from pgwarden import cli

    cfg = tmp_path / "policy.yaml"
    cfg.write_text(AGENTS_POLICY)
    base = ["policy", "explain", "--config", str(cfg), "--group", "agents"]
    assert cli.main([*base, "SELECT uuidv7()"]) == 0  # the newest release by default
    assert json.loads(capsys.readouterr().out)["serverVersion"] == 18
    assert cli.main([*base, "--server-version", "15", "SELECT uuidv7()"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["serverVersion"] == 15 and "public.uuidv7" in out["message"]
