"""Approval previews (approval.preview: rows): the reviewer sees what a held write changes.

Through the live proxy, the local approval backend and the real database: the preview's count
and masked sample in every place a reviewer (or the audit) reads them, no seeded secret in any
of them, nothing left behind by the preview's transaction, a preview stuck on a lock bounded by
its timeout, and no preview at all for a statement whose side effects a rollback cannot undo.
The Kubernetes side: an ApprovalRequest carrying a preview survives the API server's pruning and
validation, and `kubectl get` shows its row count.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonpatch
import psycopg
import pytest
from apiserver_model import Invalid, crds, store, update
from fix_pg import APP_PASSWORD, APP_USER, SHOP_DB

from pgwarden.approvals import ApprovalSpec
from pgwarden.approvals.kubernetes import build_request
from pgwarden.approvals.model import Preview
from pgwarden.operator import approvals as ar
from pgwarden.subjects import Identity, SubjectRef

API = "pgwarden.dev/v1alpha1"
TABLE = "public.preview_people"
SECRET_PREFIX = "zq-hidden-"  # no detector knows this shape: only the column's MaskingRule hides it


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def people(pg: Any) -> Iterator[None]:
    """A table of our own (the shop's are shared): `secret` is masked by a MaskingRule column."""
    pg.psql(
        f"""
        DROP TABLE IF EXISTS {TABLE};
        CREATE TABLE {TABLE} (id serial PRIMARY KEY, batch text NOT NULL, name text NOT NULL,
                              secret text NOT NULL UNIQUE, score int NOT NULL DEFAULT 0);
        GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLE} TO {APP_USER};
        GRANT USAGE ON SEQUENCE public.preview_people_id_seq TO {APP_USER};
        DROP FUNCTION IF EXISTS public.preview_touch(int);
        CREATE FUNCTION public.preview_touch(i int) RETURNS int LANGUAGE sql AS 'SELECT i + 1';
        GRANT EXECUTE ON FUNCTION public.preview_touch(int) TO {APP_USER};
    """,
        dbname=SHOP_DB,
    )
    yield
    pg.psql(
        f"DROP TABLE IF EXISTS {TABLE}; DROP FUNCTION IF EXISTS public.preview_touch(int)", dbname=SHOP_DB
    )


def seed(pg: Any, batch: str, n: int) -> list[str]:
    """`n` rows of `batch`, each with a secret of its own; returns the secrets."""
    secrets = [f"{SECRET_PREFIX}{uuid.uuid4().hex[:12]}" for _ in range(n)]
    values = ", ".join(f"('{batch}', 'person {i}', '{s}')" for i, s in enumerate(secrets))
    pg.psql(f"INSERT INTO {TABLE} (batch, name, secret) VALUES {values}", dbname=SHOP_DB)
    return secrets


def direct_count(pg: Any, batch: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM {TABLE} WHERE batch = '{batch}'", dbname=SHOP_DB).strip())


def documents(preview_timeout: str = "2s", masking: bool = True, mode: str = "wait") -> list[dict[str, Any]]:
    policy = {
        "apiVersion": API,
        "kind": "AccessPolicy",
        "metadata": {"name": "previewed", "namespace": "agents"},
        "spec": {
            "connectionRef": {"name": "shop"},
            "subjects": [{"group": "ai-agents"}],
            "rules": [
                {"action": "allow", "operations": ["select"], "tables": [TABLE]},
                {"action": "review", "operations": ["insert", "update", "delete"], "tables": [TABLE]},
            ],
            "allowedFunctions": ["public.preview_touch"],
            "defaultAction": "deny",
            "approval": {
                "reviewers": [{"group": "dba"}],
                "timeout": "30s",
                "mode": mode,
                "preview": "rows",
                "previewTimeout": preview_timeout,
            },
        },
    }
    rule = {
        "apiVersion": API,
        "kind": "MaskingRule",
        "metadata": {"name": "people", "namespace": "agents"},
        "spec": {
            "connectionRef": {"name": "shop"},
            "columns": [{"table": TABLE, "column": "secret", "strategy": "redact"}],
            "detectors": ["email", "us_ssn"],
        },
    }
    return [policy, rule] if masking else [policy]


class Hook:
    """A webhook receiver: what the approval backend posts as its notification."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                posts.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


@pytest.fixture
def previewing(people: None, make_proxy: Any, tmp_path: Path, hook: Hook) -> Any:
    def make(preview_timeout: str = "2s", masking: bool = True, mode: str = "wait") -> tuple[Any, Path, Path]:
        db, audit = tmp_path / "approvals.db", tmp_path / "audit.jsonl"
        spec = {
            "approvals": {
                "backend": "local",
                "path": str(db),
                "allowProxyUserDecisions": True,
                "notifyUrl": hook.url,
            },
            "audit": {"path": str(audit)},
        }
        return make_proxy(extra=documents(preview_timeout, masking, mode), proxy_spec=spec), db, audit

    return make


@pytest.fixture
def guards(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The AffectedGuard each approved statement's verdict carries (the relay enforces it: PW005)."""
    from pgwarden.compiled import is_compiled
    from pgwarden.proxy import gate
    from pgwarden.proxy.gate import SessionGate

    if is_compiled(gate):
        pytest.skip("spies on SessionGate._guarded, which a compiled (mypyc) build calls natively: "
                    "runs on the pure-Python build (the editable install)")

    seen: list[Any] = []
    original = SessionGate._guarded

    def spy(verdict: Any, ticket: Any, preview: Any) -> Any:
        out = original(verdict, ticket, preview)
        seen.append(out.guard)
        return out

    monkeypatch.setattr(SessionGate, "_guarded", staticmethod(spy))
    return seen


def cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgwarden.cli", "approvals", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_pending(db: Path, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            out = cli(db, "list", "--json")
            rows = (
                [r for r in json.loads(out.stdout or "[]") if r["state"] == "pending"]
                if out.returncode == 0
                else []
            )
            if rows:
                return rows[0]
        time.sleep(0.05)
    raise AssertionError("no pending request appeared")


def in_background(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except Exception as e:  # the test asserts on it
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def leaked(secrets: list[str], *texts: str) -> list[str]:
    return [s for s in secrets for t in texts if s in t]


# -- through the live proxy -----------------------------------------------------------------------
def test_held_delete_previews_count_and_masked_sample_then_runs_exactly_those_rows(
    previewing: Any, pg: Any, hook: Hook
) -> None:
    proxy, db, audit = previewing()
    secrets = seed(pg, "psql-del", 3)
    keep = seed(pg, "psql-keep", 2)
    mark = pg.log_position()
    t, box = in_background(lambda: proxy.psql("-c", f"DELETE FROM {TABLE} WHERE batch = 'psql-del'"))
    req = wait_pending(db)

    pv = req["preview"]
    assert pv["state"] == "measured" and pv["affectedRows"] == 3
    assert len(pv["sample"]) == 3
    sampled = [r["row"] for r in pv["sample"]]
    assert {r["batch"] for r in sampled} == {"psql-del"}
    assert {r["name"] for r in sampled} == {"person 0", "person 1", "person 2"}
    assert all(r["secret"] == "[redacted]" for r in sampled)  # as the agent would see it
    # the preview's transaction left nothing behind: every row is still there, read directly
    assert direct_count(pg, "psql-del") == 3
    assert "ROLLBACK" in pg.log_since(mark)

    shown = cli(db, "show", req["id"])
    assert shown.returncode == 0 and "3 rows affected" in shown.stdout and "[redacted]" in shown.stdout
    for _ in range(100):
        if hook.posts:
            break
        time.sleep(0.05)
    note = hook.posts[0]["text"]
    assert "preview: 3 rows affected" in note and "[redacted]" in note
    stored = stored_rows(db)
    assert json.loads(stored[0]["preview"])["affectedRows"] == 3

    approved = cli(db, "approve", req["id"], "--as", "dba-alice")
    assert approved.returncode == 0, approved.stderr
    assert approved.stdout.index("preview") < approved.stdout.index("statement")  # the effect first
    t.join(30)
    assert box["result"].returncode == 0, box["result"].stderr
    assert "DELETE 3" in box["result"].stdout
    assert direct_count(pg, "psql-del") == 0 and direct_count(pg, "psql-keep") == 2

    log = audit.read_text()
    requested = [json.loads(x) for x in log.splitlines() if '"requested"' in x]
    assert requested and requested[0]["approval"]["preview"]["affectedRows"] == 3
    listed = cli(db, "list", "--all", "--json").stdout
    raw = db.read_bytes() + b"".join(p.read_bytes() for p in db.parent.glob(db.name + "-wal"))
    assert not leaked(
        secrets + keep,
        json.dumps(req),
        listed,
        shown.stdout,
        note,
        approved.stdout,
        log,
        json.dumps(stored),
        raw.decode("latin-1"),
    )


def stored_rows(db: Path) -> list[dict[str, Any]]:
    """The requests as the local backend stored them."""
    import sqlite3

    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM requests")]
    finally:
        con.close()


def test_parameters_from_a_driver_are_previewed_with_their_values(
    previewing: Any, pg: Any, guards: list[Any]
) -> None:
    proxy, db, audit = previewing()
    secrets = seed(pg, "drv-del", 4)
    seed(pg, "drv-other", 1)

    def run() -> int:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            cur = conn.execute(f"DELETE FROM {TABLE} WHERE batch = %s", ("drv-del",))
            return cur.rowcount

    t, box = in_background(run)
    req = wait_pending(db)
    assert req["params"] == ["drv-del"]
    assert req["preview"]["state"] == "measured" and req["preview"]["affectedRows"] == 4
    assert direct_count(pg, "drv-del") == 4
    assert cli(db, "approve", req["id"], "--as", "dba-alice").returncode == 0
    t.join(30)
    assert box.get("result") == 4, box
    assert direct_count(pg, "drv-del") == 0 and direct_count(pg, "drv-other") == 1
    assert not leaked(secrets, json.dumps(req), audit.read_text())
    (guard,) = guards
    assert (guard.limit, guard.source) == (4, f"request {req['id']}")


def test_a_deferred_approval_runs_bound_to_its_preview(previewing: Any, pg: Any, guards: list[Any]) -> None:
    proxy, db, _ = previewing(mode="defer")
    seed(pg, "defer-del", 2)
    sql = f"DELETE FROM {TABLE} WHERE batch = 'defer-del'"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as e:
            conn.execute(sql)
        assert e.value.sqlstate == "PW001"
        req = wait_pending(db)
        assert req["preview"]["affectedRows"] == 2 and direct_count(pg, "defer-del") == 2
        assert cli(db, "approve", req["id"], "--as", "dba-alice").returncode == 0
        assert conn.execute(sql).rowcount == 2
    assert direct_count(pg, "defer-del") == 0
    (guard,) = guards
    assert (guard.limit, guard.source) == (2, f"request {req['id']}")


def test_update_sample_shows_before_and_after_masked(previewing: Any, pg: Any) -> None:
    proxy, db, _ = previewing()
    secrets = seed(pg, "upd", 2)
    t, box = in_background(
        lambda: proxy.psql("-c", f"UPDATE {TABLE} SET score = score + 5 WHERE batch = 'upd'")
    )
    req = wait_pending(db)
    pv = req["preview"]
    assert pv.get("affectedRows") == 2, pv
    for r in pv["sample"]:
        assert r["before"]["score"] == "0" and r["after"]["score"] == "5"
        assert r["before"]["id"] == r["after"]["id"]
        assert r["before"]["secret"] == r["after"]["secret"] == "[redacted]"
    assert int(pg.psql(f"SELECT max(score) FROM {TABLE} WHERE batch = 'upd'", dbname=SHOP_DB)) == 0
    assert cli(db, "deny", req["id"], "--as", "dba-alice").returncode == 0
    t.join(30)
    assert "PW002" in box["result"].stderr or "denied" in box["result"].stderr
    assert not leaked(secrets, json.dumps(req))


def test_preview_waiting_on_a_lock_times_out_within_its_bound(
    previewing: Any, pg: Any, guards: list[Any]
) -> None:
    proxy, db, _ = previewing(preview_timeout="1s")
    seed(pg, "locked", 2)
    holder = psycopg.connect(pg.dsn(SHOP_DB))
    try:
        holder.execute(
            f"SELECT id FROM {TABLE} WHERE batch = 'locked' FOR UPDATE"
        )  # a transaction holds the rows
        started = time.time()
        t, box = in_background(lambda: proxy.psql("-c", f"DELETE FROM {TABLE} WHERE batch = 'locked'"))
        req = wait_pending(db)
        # the request is filed once the preview gave up: the agent was held no longer than the bound
        # slack: psql starting and logging in through the proxy; the lock is held until the end
        assert 0.5 <= req["createdAt"] - started < 1.0 + 1.25  # lock_timeout ends the wait within the bound
        assert req["preview"]["state"] == "timeout"
        assert "lock" in req["preview"]["reason"]
        assert "affectedRows" not in req["preview"]
        refused = cli(db, "approve", req["id"], "--as", "dba-alice")
        assert refused.returncode != 0 and "--without-preview" in refused.stderr
        assert cli(db, "list", "--json").stdout.count('"pending"') == 1  # still undecided
    finally:
        holder.rollback()
        holder.close()
    assert direct_count(pg, "locked") == 2
    ok = cli(db, "approve", req["id"], "--as", "dba-alice", "--without-preview")
    assert ok.returncode == 0, ok.stderr
    t.join(30)
    assert "DELETE 2" in box["result"].stdout
    assert direct_count(pg, "locked") == 0
    assert guards == [None]  # no measured preview: no row bound


def test_preview_sets_the_servers_timeouts_again_when_the_write_runs(previewing: Any, pg: Any) -> None:
    """The server's own limits count from the moment the previewed write starts: set only at BEGIN
    they would also count the connection and the lookup, and on a loaded server a lock wait could
    outlast the preview's deadline (reported as no answer instead of as the lock it waited for)."""
    proxy, db, _ = previewing(preview_timeout="2s")
    seed(pg, "timeouts", 1)
    mark = pg.log_position()
    t, box = in_background(lambda: proxy.psql("-c", f"DELETE FROM {TABLE} WHERE batch = 'timeouts'"))
    req = wait_pending(db)
    assert req["preview"]["state"] == "measured" and req["preview"]["affectedRows"] == 1
    log = pg.log_since(mark)
    locks = [(mt.start(), int(mt.group(1))) for mt in re.finditer(r"lock_timeout = '(\d+)ms'", log)]
    assert len(locks) == 2, log[-3000:]
    (at_begin, first), (before_run, second) = locks
    assert second <= first < 2000 * 0.85  # from what was left later, within the deadline's share
    assert "statement: BEGIN; " in log[log.rfind("\n", 0, at_begin) + 1 : at_begin]  # the first, with BEGIN
    run = log.index("WHERE batch = 'timeouts'", before_run)  # the previewed write, after the second
    assert run > before_run and log.rfind("lock_timeout", 0, run) == before_run
    assert cli(db, "deny", req["id"], "--as", "dba-alice").returncode == 0
    t.join(30)
    assert direct_count(pg, "timeouts") == 1


def test_statement_calling_a_function_gets_no_preview_and_is_never_run_for_one(
    previewing: Any, pg: Any
) -> None:
    proxy, db, _ = previewing(masking=False)  # masking refuses opaque functions over this table itself
    seed(pg, "fn", 2)
    mark = pg.log_position()
    t, box = in_background(
        lambda: proxy.psql("-c", f"UPDATE {TABLE} SET score = public.preview_touch(score) WHERE batch = 'fn'")
    )
    req = wait_pending(db)
    assert req["preview"]["state"] == "unavailable"
    assert "public.preview_touch()" in req["preview"]["reason"]
    assert "pgwarden_preview" not in pg.log_since(mark) and "preview_touch" not in pg.log_since(mark)
    shown = cli(db, "show", req["id"]).stdout
    assert "no preview: it calls public.preview_touch()" in shown
    assert cli(db, "deny", req["id"], "--as", "dba-alice").returncode == 0
    t.join(30)
    assert int(pg.psql(f"SELECT max(score) FROM {TABLE} WHERE batch = 'fn'", dbname=SHOP_DB)) == 0


def test_insert_preview_counts_new_rows_and_leaves_none(previewing: Any, pg: Any) -> None:
    proxy, db, _ = previewing()
    t, box = in_background(
        lambda: proxy.psql(
            "-c", f"INSERT INTO {TABLE} (batch, name, secret) VALUES ('ins', 'a', 'x1'), ('ins', 'b', 'x2')"
        )
    )
    req = wait_pending(db)
    assert req["preview"]["affectedRows"] == 2
    assert {r["row"]["name"] for r in req["preview"]["sample"]} == {"a", "b"}
    assert (
        "nextval() advances its sequence" in req["preview"].get("reason", "")
        or req["preview"]["state"] == "measured"
    )
    assert direct_count(pg, "ins") == 0
    assert cli(db, "deny", req["id"], "--as", "dba-alice").returncode == 0
    t.join(30)
    assert direct_count(pg, "ins") == 0


# -- the Kubernetes side --------------------------------------------------------------------------
NS = "agents"
NOW = 1_790_000_000.0
AGENT = Identity(
    subject="system:serviceaccount:agents:cursor-agent",
    groups=("system:serviceaccounts",),
    service_account="agents/cursor-agent",
    method="pod",
)
OPERATOR = {
    "username": "system:serviceaccount:pgwarden-system:pgwarden",
    "groups": ["system:serviceaccounts"],
}
POLICY = ar.ReviewPolicy(id=f"{NS}/orders", connection="orders-prod", reviewers=(SubjectRef(group="dba"),))
PREVIEW = Preview(
    "measured",
    affected_rows=3,
    columns=("id", "secret"),
    sample=(
        {"before": {"id": "1", "secret": "[redacted]"}, "after": {"id": "1", "secret": None}},
        {"row": {"id": "2", "secret": "[redacted]"}},
    ),
    reason="nextval() advances its sequence",
)


def stored_request(preview: Preview | None = PREVIEW) -> dict[str, Any]:
    spec = ApprovalSpec(
        connection="orders-prod",
        requester=AGENT,
        workload={"namespace": NS, "pod": "cursor-agent-7d9f", "service_account": "cursor-agent"},
        statement="DELETE FROM orders WHERE id < $1",
        params=("4",),
        rule=f"{NS}/orders rule 2 (writes)",
        reviewers=(SubjectRef(group="dba"),),
        min_approvals=1,
        timeout=900,
        mode="defer",
        preview=preview,
    )
    body = build_request(spec, "orders-prod-abc-123", NS, NOW)
    stamp = ar.mutate("CREATE", None, body, OPERATOR, POLICY, NOW, gateway=OPERATOR["username"])
    assert stamp.allowed, stamp.message
    stored, dropped = store(jsonpatch.apply_patch(body, stamp.json_patch(body)), crds()["ApprovalRequest"])
    assert dropped == []
    return stored


def test_a_request_with_a_preview_survives_pruning_and_reads_back() -> None:
    stored = stored_request()
    assert stored["spec"]["preview"] == PREVIEW.to_json()
    assert Preview.from_json(stored["spec"]["preview"]) == PREVIEW


def test_failed_preview_survives_too() -> None:
    failed = Preview("timeout", reason="it waited for a lock another transaction holds")
    assert Preview.from_json(stored_request(failed)["spec"]["preview"]) == failed


def test_rows_printer_column_reads_the_previewed_count() -> None:
    (version,) = crds()["ApprovalRequest"]["spec"]["versions"]
    col = next(c for c in version["additionalPrinterColumns"] if c["name"] == "Rows")
    assert col["jsonPath"] == ".spec.preview.affectedRows" and col["type"] == "integer"
    assert not col.get("priority")  # shown by a plain `kubectl get approvalrequests`
    assert stored_request()["spec"]["preview"]["affectedRows"] == 3


def test_the_previewed_count_cannot_be_changed_after_filing() -> None:
    stored = stored_request()
    crd = crds()["ApprovalRequest"]
    for patch in (
        {"spec": {"preview": {"affectedRows": 3_000_000}}},
        {"spec": {"preview": None}},
        {"spec": {"preview": {"state": "unavailable"}}},
    ):
        with pytest.raises(Invalid, match="only spec.decision"):
            update(stored, patch, crd)
    decided, _ = update(stored, {"spec": {"decision": "approved"}}, crd)  # the decision itself still may
    assert decided["spec"]["preview"] == stored["spec"]["preview"]


# -- the preview text means what the statement means ----------------------------------------------
REWRITES = [
    ("DELETE FROM {t} WHERE batch = 'rw' AND score < 2", 2),
    ("DELETE FROM {t} p USING {t} q WHERE p.id = q.id AND q.batch = 'rw' RETURNING p.name", 3),
    ("UPDATE {t} SET score = score + 1 WHERE batch = 'rw' RETURNING id", 3),
    (
        "UPDATE {t} AS p SET name = q.name || '!' FROM {t} q WHERE p.id = q.id AND q.batch = 'rw' AND q.score > 0",
        2,
    ),
    ("UPDATE ONLY {t} SET score = 0", None),  # every row: compared with the statement's own count
    ("WITH w AS (SELECT 'rw' AS b) UPDATE {t} SET score = 7 FROM w WHERE batch = w.b", 3),
    ("WITH w AS (SELECT 'rw' AS b) INSERT INTO {t} (batch, name, secret) SELECT b, 'n', 's' FROM w", 1),
    ("INSERT INTO {t} (batch, name, secret) VALUES ('rw', 'a', 'x'), ('rw', 'b', 'y')", 2),
    (
        "INSERT INTO {t} (id, batch, name, secret) SELECT id, batch, name, secret FROM {t} WHERE batch = 'rw' "
        "ON CONFLICT (id) DO UPDATE SET score = EXCLUDED.score + 1",
        3,
    ),
    (
        "INSERT INTO {t} (id, batch, name, secret) SELECT id, batch, name, secret FROM {t} WHERE batch = 'rw' "
        "ON CONFLICT (id) DO NOTHING",
        0,
    ),
    (
        "MERGE INTO {t} p USING (SELECT id FROM {t} WHERE batch = 'rw' AND score = 1) s ON p.id = s.id "
        "WHEN MATCHED THEN DELETE",
        1,
    ),
]


@pytest.mark.parametrize(("statement", "expected"), REWRITES)
def test_preview_text_counts_what_the_statement_changes(
    people: None, pg: Any, statement: str, expected: int | None
) -> None:
    """The statement and its preview text, each run by the agent's upstream role in a transaction
    rolled back: the same count, and the preview's sample is the changed rows."""
    from pgwarden.policy.preview import PreviewPlan, plan_preview

    pg.psql(
        f"DELETE FROM {TABLE} WHERE batch = 'rw'; INSERT INTO {TABLE} (batch, name, secret, score) "
        "VALUES ('rw', 'a', 's1', 0), ('rw', 'b', 's2', 1), ('rw', 'c', 's3', 2)",
        dbname=SHOP_DB,
    )
    sql = statement.format(t=TABLE)
    with psycopg.connect(pg.dsn(SHOP_DB, user=APP_USER, password=APP_PASSWORD)) as conn:
        with conn.transaction(force_rollback=True):
            real = conn.execute(sql).rowcount
        plan = plan_preview(sql, conn.info.server_version // 10000)
        assert isinstance(plan, PreviewPlan), plan
        with conn.transaction(force_rollback=True):
            cur = conn.execute(plan.sql)
            rows = [] if plan.count_only else cur.fetchall()
            counted = cur.rowcount if plan.count_only else (rows[0][0] if rows else 0)
    assert counted == real
    if expected is not None:
        assert real == expected
    if not plan.count_only:
        assert len(rows) == min(real, 5)
        if plan.before_sql and rows:  # UPDATE: the same row before and after
            n = (len(rows[0]) - 1) // 2
            assert all(r[1] == r[1 + n] for r in rows)  # id
    assert direct_count(pg, "rw") == 3  # rolled back


@pytest.mark.parametrize(
    ("statement", "why"),
    [
        ("DELETE FROM t WHERE id = public.f(1)", "public.f()"),
        ("DELETE FROM t WHERE id = f(1)", "f()"),
        ("UPDATE t SET n = setval('s', 1)", "setval()"),
        ("INSERT INTO t SELECT * FROM dblink('x', 'y') AS r(a int)", "dblink()"),
        ("WITH d AS (DELETE FROM t RETURNING *) INSERT INTO u SELECT * FROM d", "data-modifying WITH"),
        ("DELETE FROM t WHERE CURRENT OF c", "CURRENT OF"),
        ("DELETE FROM t; DELETE FROM u", "2 statements"),
        ("SELECT 1", "only INSERT, UPDATE, DELETE and MERGE"),
        ("EXECUTE p(1)", "only INSERT, UPDATE, DELETE and MERGE"),
        ("DELETE FROM", "could not be parsed"),
    ],
)
def test_statements_a_rollback_cannot_undo_get_no_preview(statement: str, why: str) -> None:
    from pgwarden.policy.preview import NoPreview, plan_preview

    plan = plan_preview(statement, 15)
    assert isinstance(plan, NoPreview) and why in plan.reason


def test_sequences_are_previewed_and_say_what_they_skip() -> None:
    from pgwarden.policy.preview import PreviewPlan, plan_preview

    plan = plan_preview("INSERT INTO t (id) VALUES (nextval('s')), (upper('x')::int)", 15)
    assert isinstance(plan, PreviewPlan) and "nextval() advances its sequence" in plan.notes[0]
    assert isinstance(
        plan_preview("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", 17), PreviewPlan
    )
    assert not plan_preview("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", 17).count_only  # type: ignore[union-attr]


# -- the preview binds a deferred approval, and reviewers of a cluster read it first --------------
async def test_a_deferred_approval_carries_its_preview_to_the_run(tmp_path: Path) -> None:
    from pgwarden.approvals import LocalApprovals

    q = LocalApprovals(tmp_path / "a.db")
    s = ApprovalSpec(
        connection="shop",
        requester=Identity(subject="agent", groups=("ai-agents",)),
        workload={},
        statement="DELETE FROM t WHERE id < 4",
        params=(),
        rule="p rule 1",
        reviewers=(),
        min_approvals=1,
        timeout=60,
        mode="defer",
        preview=PREVIEW,
    )
    t = await q.create(s)
    q.decide_sync(t.id, "alice", "approved")
    used = await q.consume(s)
    assert used is not None and used.preview == PREVIEW  # the gate's AffectedGuard limit: 3


def test_an_old_queue_file_gains_the_preview_column(tmp_path: Path) -> None:
    import sqlite3

    from pgwarden.approvals import LocalApprovals
    from pgwarden.approvals.local import SCHEMA

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript(
        SCHEMA.replace(
            ",\n    preview TEXT NOT NULL DEFAULT ''  -- JSON of Preview.to_json(); '' for none", ""
        )
    )
    con.close()
    LocalApprovals(db)
    con = sqlite3.connect(db)
    assert "preview" in {r[1] for r in con.execute("PRAGMA table_info(requests)")}
    con.close()


def test_kubectl_recipe_shows_the_preview_before_the_statement() -> None:
    import yaml

    from pgwarden.approvals.cli import render_request, rows_from_objects

    (row,) = rows_from_objects(yaml.safe_dump(stored_request()))
    text = render_request(row, NOW)
    assert text.index("3 rows affected") < text.index("DELETE FROM orders")
    assert "before {" in text and "after  {" in text


def test_sampled_values_cannot_steer_the_notification_or_the_terminal() -> None:
    """A sampled value comes from the database, which the agent may have written."""
    from pgwarden.approvals.cli import render_request, rows_from_objects
    from pgwarden.approvals.model import Ticket, notification_text

    forged = "x```\n*PRE-APPROVED* <!channel> <https://evil.example|approve>\x1b[2K\u202e"
    preview = Preview("measured", affected_rows=1, sample=({"row": {"note": forged}},), columns=("note",))
    spec = ApprovalSpec(
        connection="shop",
        requester=AGENT,
        workload={},
        statement="DELETE FROM t WHERE id = 1",
        params=(),
        rule="p rule 1",
        reviewers=(),
        min_approvals=1,
        timeout=60,
        mode="wait",
        preview=preview,
    )
    text = notification_text(spec, Ticket(id="r1", name="r1", expires_at=NOW, approve_command="approve r1"))
    assert "<!channel>" not in text and "<https://" not in text and "\x1b" not in text
    assert text.count("```") % 2 == 0 and "```\n*PRE-APPROVED*" not in text
    stored = stored_request(preview)
    (row,) = rows_from_objects(json.dumps(stored))
    shown = render_request(row, NOW)
    assert "\x1b" not in shown and "\u202e" not in shown and "\\u202e" in shown


def test_a_failed_preview_says_why_without_the_masked_value(previewing: Any, pg: Any) -> None:
    """A key conflict on a masked column: the server's error names the value; the request does not."""
    proxy, db, _ = previewing()
    (secret,) = seed(pg, "dup", 1)
    t, box = in_background(
        lambda: proxy.psql(
            "-c", f"INSERT INTO {TABLE} (batch, name, secret) VALUES ('dup2', 'x', '{secret}')"
        )
    )
    req = wait_pending(db)
    pv = req["preview"]
    assert pv["state"] == "failed" and "23505" in pv["reason"]
    assert secret not in json.dumps(pv)
    refused = cli(db, "approve", req["id"], "--as", "dba-alice")
    assert refused.returncode != 0 and "--without-preview" in refused.stderr
    assert cli(db, "deny", req["id"], "--as", "dba-alice").returncode == 0
    t.join(30)
    assert direct_count(pg, "dup2") == 0


def test_kubectl_describe_names_the_preview_and_the_webhook_keeps_the_sample() -> None:
    stored = stored_request()
    change = ar.next_status(stored, NOW + 1)
    requested = next(msg for _, reason, msg in change.events if reason == "Requested")
    assert "(preview: 3 rows)" in requested
    # the CEL rule leaves the sample to the webhook (cost); the webhook refuses any change to it
    forged = json.loads(json.dumps(stored))
    forged["spec"]["preview"]["sample"] = []
    for verdict in (
        ar.mutate("UPDATE", stored, forged, OPERATOR, POLICY, NOW + 1),
        ar.validate("UPDATE", stored, forged, OPERATOR, POLICY, NOW + 1),
    ):
        assert not verdict.allowed and "only spec.decision and spec.reason" in verdict.message


def test_binary_parameters_from_asyncpg_are_previewed(previewing: Any, pg: Any) -> None:
    """asyncpg sends integers in binary: the preview binds the very bytes the agent sent."""
    import asyncio


    proxy, db, _ = previewing()
    seed(pg, "apg", 3)

    async def run() -> str:
        conn = await proxy.asyncpg()
        try:
            return str(await conn.execute(f"DELETE FROM {TABLE} WHERE batch = $1 AND score < $2", "apg", 1))
        finally:
            await conn.close()

    t, box = in_background(lambda: asyncio.run(run()))
    req = wait_pending(db)
    assert req["params"] == ["\\x617067", "\\x00000001"]  # asyncpg sends both in binary: shown as hex
    assert req["preview"]["state"] == "measured" and req["preview"]["affectedRows"] == 3, req["preview"]
    assert cli(db, "approve", req["id"], "--as", "dba-alice").returncode == 0
    t.join(30)
    assert box.get("result") == "DELETE 3", box


# -- the preview and the guard together ---------------------------------------------------------------
def test_approved_but_grown_since_the_preview_is_undone_with_pw005(previewing: Any, pg: Any) -> None:
    """The reviewer saw 2 rows; a third appears (written directly) before approval: the run is
    refused with PW005 naming both counts and the request, and nothing is deleted."""
    proxy, db, audit = previewing()
    seed(pg, "grow-del", 2)
    t, box = in_background(lambda: proxy.psql("-c", f"DELETE FROM {TABLE} WHERE batch = 'grow-del'"))
    req = wait_pending(db)
    assert req["preview"]["state"] == "measured" and req["preview"]["affectedRows"] == 2
    seed(pg, "grow-del", 1)  # the data changed between review and run
    assert cli(db, "approve", req["id"], "--as", "dba-alice").returncode == 0
    t.join(30)
    res = box["result"]
    assert res.returncode != 0
    assert "PW005" in res.stderr or "3 rows" in res.stderr, res.stderr
    assert "3 rows" in res.stderr and "2 approved" in res.stderr and req["id"] in res.stderr, res.stderr
    assert direct_count(pg, "grow-del") == 3  # undone: nothing was deleted
    outcomes = [json.loads(x) for x in audit.read_text().splitlines() if '"statement.outcome"' in x]
    assert any(o.get("sqlstate") == "PW005" and o.get("undone") for o in outcomes)


def test_approved_inside_an_open_transaction_grown_rolls_back_to_a_savepoint(previewing: Any, pg: Any) -> None:
    """Inside the agent's transaction the refused write is undone alone: the transaction goes on."""
    import psycopg

    proxy, db, _ = previewing()
    seed(pg, "tx-del", 2)
    conn = psycopg.connect(proxy.dsn())  # not autocommit: psycopg opens a transaction
    box: dict[str, Any] = {}

    def run() -> None:
        box["before"] = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE batch = 'tx-del'").fetchone()
        try:
            conn.execute(f"DELETE FROM {TABLE} WHERE batch = %s", ("tx-del",))
        except psycopg.Error as e:
            box["sqlstate"], box["message"] = e.sqlstate, str(e)
        box["status"] = conn.info.transaction_status
        box["after"] = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE batch = 'tx-del'").fetchone()
        conn.commit()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    req = wait_pending(db)
    assert req["preview"]["affectedRows"] == 2
    seed(pg, "tx-del", 1)
    assert cli(db, "approve", req["id"], "--as", "dba-alice").returncode == 0
    t.join(30)
    conn.close()
    assert box.get("sqlstate") == "PW005", box
    assert "3 rows" in box["message"] and req["id"] in box["message"]
    assert box["before"] == (2,)
    # the transaction is still usable (not aborted), and the guarded DELETE left nothing behind in it
    assert box["status"] == psycopg.pq.TransactionStatus.INTRANS and box["after"] == (3,)
    assert direct_count(pg, "tx-del") == 3


# -- writes that would run code besides themselves ------------------------------------------------------
@pytest.mark.parametrize("how", ["trigger", "cascade", "default", "index", "domain"])
def test_a_write_that_fires_triggers_gets_no_preview_and_is_never_run_for_one(
    previewing: Any, pg: Any, how: str
) -> None:
    """A trigger's function may reach outside the transaction (dblink, an untrusted language), on
    the table itself or on a table a foreign key cascades to: the write is not run before a human
    has approved it, and the request says why."""
    setup = {
        "trigger": f"""
            CREATE FUNCTION public.preview_note() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN OLD; END';
            CREATE TRIGGER preview_outside BEFORE DELETE ON {TABLE} FOR EACH ROW EXECUTE FUNCTION public.preview_note();
        """,
        "cascade": f"""
            CREATE FUNCTION public.preview_note() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN OLD; END';
            CREATE TABLE public.preview_child (id serial PRIMARY KEY,
                person int REFERENCES {TABLE} (id) ON DELETE CASCADE);
            CREATE TRIGGER preview_outside BEFORE DELETE ON public.preview_child
                FOR EACH ROW EXECUTE FUNCTION public.preview_note();
        """,
        # ON DELETE SET DEFAULT evaluates the child's default, which calls a function of its own
        "default": f"""
            CREATE FUNCTION public.preview_outside() RETURNS int LANGUAGE sql AS 'SELECT NULL::int';
            CREATE TABLE public.preview_child (id serial PRIMARY KEY,
                person int DEFAULT public.preview_outside() REFERENCES {TABLE} (id) ON DELETE SET DEFAULT);
        """,
        # an index expression and a domain's CHECK are evaluated by writes, never named by them
        "index": f"""
            CREATE FUNCTION public.preview_outside(t text) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT t';
            CREATE INDEX preview_outside_idx ON {TABLE} (public.preview_outside(name));
        """,
        "domain": f"""
            CREATE FUNCTION public.preview_outside(t text) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true';
            CREATE DOMAIN public.preview_tag AS text CHECK (public.preview_outside(VALUE));
            ALTER TABLE {TABLE} ADD COLUMN tag public.preview_tag;
        """,
    }[how]
    pg.psql(setup, dbname=SHOP_DB)
    try:
        proxy, db, _ = previewing()
        seed(pg, f"trg-{how}", 2)
        mark = pg.log_position()
        t, box = in_background(lambda: proxy.psql("-c", f"DELETE FROM {TABLE} WHERE batch = 'trg-{how}'"))
        req = wait_pending(db)
        pv = req["preview"]
        assert pv["state"] == "unavailable" and "preview_outside" in pv["reason"], pv
        assert "pgwarden_preview" not in pg.log_since(mark)  # the write was never run for a preview
        assert direct_count(pg, f"trg-{how}") == 2
        assert cli(db, "deny", req["id"], "--as", "dba-alice").returncode == 0
        t.join(30)
        assert direct_count(pg, f"trg-{how}") == 2
    finally:
        pg.psql("DROP TABLE IF EXISTS public.preview_child; DROP TRIGGER IF EXISTS preview_outside ON "
                f"{TABLE}; DROP FUNCTION IF EXISTS public.preview_note(); "
                f"ALTER TABLE {TABLE} DROP COLUMN IF EXISTS tag; DROP DOMAIN IF EXISTS public.preview_tag; "
                "DROP INDEX IF EXISTS public.preview_outside_idx; "
                "DROP FUNCTION IF EXISTS public.preview_outside(); DROP FUNCTION IF EXISTS public.preview_outside(text)",
                dbname=SHOP_DB)


def test_the_effects_query_names_views_triggers_and_rules() -> None:
    from pgwarden.policy.preview import NoPreview, effects_refusal, effects_sql, plan_preview

    plan = plan_preview('DELETE FROM "Odd""Schema".t WHERE id = 1')
    assert not isinstance(plan, NoPreview) and plan.target == '"Odd""Schema"."t"'
    assert "'\"Odd\"\"Schema\".\"t\"'::regclass" in effects_sql(plan)
    assert effects_refusal(None, None, None) is None
    assert "v (v)" in (effects_refusal("v (v)", None, None) or "")
    assert "trg on t" in (effects_refusal(None, "trg on t", None) or "")
    assert "r on t" in (effects_refusal(None, None, "r on t") or "")
    assert "f(integer)" in (effects_refusal(None, None, None, "f(integer)") or "")


# -- approving a request whose preview did not measure it, in a cluster -----------------------------------
REVIEWER = {"username": "carol", "groups": ["dba"]}


@pytest.mark.parametrize("state", ["failed", "timeout"])
def test_kubectl_approval_of_an_unmeasured_preview_needs_without_preview(state: str) -> None:
    """As `pgwarden approvals approve --without-preview`: the webhook and the CRD's own rule refuse a
    plain `decision: approved` on a request whose preview failed or timed out, and say how to accept it."""
    stored = stored_request(Preview(state, reason="it waited for a lock another transaction holds"))
    crd = crds()["ApprovalRequest"]
    plain = {"spec": {"decision": "approved"}}
    refused = ar.mutate("UPDATE", stored, jsonpatch.apply_patch(stored, [
        {"op": "replace", "path": "/spec/decision", "value": "approved"}]), REVIEWER, POLICY, NOW + 5)
    assert not refused.allowed and "withoutPreview" in refused.message and "kubectl patch" in refused.message
    with pytest.raises(Invalid, match="withoutPreview"):  # also when the webhook is not called
        update(stored, plain, crd)

    accepting = {"spec": {"decision": "approved", "withoutPreview": True}}
    new = jsonpatch.apply_patch(stored, [{"op": "replace", "path": "/spec/decision", "value": "approved"},
                                         {"op": "add", "path": "/spec/withoutPreview", "value": True}])
    stamped = ar.mutate("UPDATE", stored, new, REVIEWER, POLICY, NOW + 5)
    assert stamped.allowed, stamped.message
    after = jsonpatch.apply_patch(new, stamped.json_patch(new))
    assert ar.validate("UPDATE", stored, after, REVIEWER, POLICY, NOW + 5).allowed
    decided, dropped = update(stored, accepting, crd)
    assert decided["spec"]["withoutPreview"] is True and dropped == []


def test_a_measured_preview_is_approved_without_the_flag_and_the_flag_goes_only_with_a_decision() -> None:
    stored = stored_request()
    new = jsonpatch.apply_patch(stored, [{"op": "replace", "path": "/spec/decision", "value": "approved"}])
    assert ar.mutate("UPDATE", stored, new, REVIEWER, POLICY, NOW + 5).allowed
    only_flag = jsonpatch.apply_patch(stored, [{"op": "add", "path": "/spec/withoutPreview", "value": True}])
    refused = ar.mutate("UPDATE", stored, only_flag, REVIEWER, POLICY, NOW + 5)
    assert not refused.allowed and "together with the decision" in refused.message


def test_an_overload_of_a_builtin_name_is_never_run_for_a_preview(previewing: Any, pg: Any) -> None:
    """A function of the database's own that a built-in's name resolves to (upper(int) beside
    upper(text)): not run before approval. The witness sequence would advance (a rollback does not
    undo it) if the function ran."""
    pg.psql(f"""
        CREATE SEQUENCE public.preview_witness;
        GRANT USAGE, SELECT, UPDATE ON SEQUENCE public.preview_witness TO {APP_USER};
        CREATE FUNCTION public.upper(i int) RETURNS text LANGUAGE sql
            AS 'SELECT nextval(''public.preview_witness'')::text';
    """, dbname=SHOP_DB)
    try:
        proxy, db, _ = previewing(masking=False)  # (masking refuses an unknown function in WHERE itself)
        seed(pg, "ovl", 2)
        t, box = in_background(lambda: proxy.psql("-c", f"DELETE FROM {TABLE} WHERE batch = 'ovl' AND upper(1) > ''"))
        req = wait_pending(db)
        assert req["preview"]["state"] == "unavailable", req["preview"]
        assert "upper(integer)" in req["preview"]["reason"]
        assert cli(db, "deny", req["id"], "--as", "dba-alice").returncode == 0
        t.join(30)
        assert pg.psql("SELECT last_value, is_called FROM public.preview_witness", dbname=SHOP_DB).strip() == "1|f"
        assert direct_count(pg, "ovl") == 2
    finally:
        pg.psql("DROP FUNCTION IF EXISTS public.upper(int); DROP SEQUENCE IF EXISTS public.preview_witness",
                dbname=SHOP_DB)


@pytest.mark.parametrize(
    ("setup", "where", "named"),
    [
        # functional notation: p.pw_touch and (p).pw_touch both call pw_touch(p)
        (f"CREATE FUNCTION public.pw_touch(r {TABLE}) RETURNS boolean LANGUAGE sql "
         "AS 'SELECT nextval(''public.preview_witness'') > 0'", "p.pw_touch", "pw_touch"),
        (f"CREATE FUNCTION public.pw_touch(r {TABLE}) RETURNS boolean LANGUAGE sql "
         "AS 'SELECT nextval(''public.preview_witness'') > 0'", "(p).pw_touch", "pw_touch"),
        # a cast to a domain runs its CHECK, also as a field of a composite type
        ("CREATE FUNCTION public.pw_check(t text) RETURNS boolean LANGUAGE sql "
         "AS 'SELECT nextval(''public.preview_witness'') > 0'; "
         "CREATE DOMAIN public.pw_dom AS text CHECK (public.pw_check(VALUE))",
         "p.batch::text = 'fnx'::public.pw_dom", "pw_check"),
        ("CREATE FUNCTION public.pw_check(t text) RETURNS boolean LANGUAGE sql "
         "AS 'SELECT nextval(''public.preview_witness'') > 0'; "
         "CREATE DOMAIN public.pw_dom AS text CHECK (public.pw_check(VALUE)); "
         "CREATE TYPE public.pw_pair AS (a public.pw_dom, b int)",
         "(ROW('fnx', 1)::public.pw_pair).b = 1", "pw_check"),
    ],
    ids=["qualified-column", "field-selection", "domain-cast", "domain-in-composite"],
)
def test_code_the_statement_reaches_without_calling_it_is_never_run_for_a_preview(
        previewing: Any, pg: Any, setup: str, where: str, named: str) -> None:
    """Functions a statement runs without a call in its text — `t.f` is f(t) when t has no
    column f, a cast to a domain runs the domain's CHECK — are not run before approval: the
    witness sequence would advance (a rollback does not undo it) if they ran."""
    pg.psql(f"CREATE SEQUENCE public.preview_witness; "
            f"GRANT USAGE, SELECT, UPDATE ON SEQUENCE public.preview_witness TO {APP_USER}; {setup}",
            dbname=SHOP_DB)
    try:
        proxy, db, _ = previewing(masking=False)
        batch = f"fx{zlib.crc32(where.encode())}"  # one batch per case: the rows stay (none is deleted)
        seed(pg, batch, 2)
        t, box = in_background(lambda: proxy.psql("-c", f"DELETE FROM {TABLE} AS p WHERE p.batch = '{batch}' AND {where}"))
        req = wait_pending(db)
        assert req["preview"]["state"] == "unavailable", req["preview"]
        assert named in req["preview"]["reason"]
        assert cli(db, "deny", req["id"], "--as", "dba-alice").returncode == 0
        t.join(30)
        assert pg.psql("SELECT last_value, is_called FROM public.preview_witness", dbname=SHOP_DB).strip() == "1|f"
        assert direct_count(pg, batch) == 2
    finally:
        pg.psql("DROP TYPE IF EXISTS public.pw_pair; DROP DOMAIN IF EXISTS public.pw_dom; "
                f"DROP FUNCTION IF EXISTS public.pw_check(text); DROP FUNCTION IF EXISTS public.pw_touch({TABLE}); "
                "DROP SEQUENCE IF EXISTS public.preview_witness", dbname=SHOP_DB)


def test_a_delete_using_another_table_samples_the_deleted_rows_only() -> None:
    from pgwarden.policy.preview import NoPreview, plan_preview

    plan = plan_preview("DELETE FROM t AS x USING c WHERE c.flag AND x.id = c.id")
    assert not isinstance(plan, NoPreview)
    assert "RETURNING x.*" in plan.sql and plan.reads == ('"c"',)
    merge = plan_preview("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", 17)
    assert not isinstance(merge, NoPreview) and "RETURNING t.*" in merge.sql
