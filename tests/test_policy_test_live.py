"""`pgwarden policy test` against audit logs the live proxy wrote, and policy unit-case files.

The proxy runs with an AccessPolicy and an audit log (rotating, so the replay must read the
rotated files too); agents' statements go through it with psql and pg8000; then the CLI runs
as a subprocess against candidate policies, without a database.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
import yaml

API = "pgwarden.dev/v1alpha1"
RECORDED = {
    "apiVersion": API,
    "kind": "AccessPolicy",
    "metadata": {"name": "agents"},
    "spec": {
        "connectionRef": {"name": "shop"},
        "subjects": [{"group": "ai-agents"}],
        "rules": [
            {
                "name": "read",
                "action": "allow",
                "operations": ["select"],
                "tables": ["public.orders", "public.customers", "public.audit_scratch"],
            },
            {
                "name": "scratch",
                "action": "allow",
                "operations": ["insert", "update", "delete"],
                "tables": ["public.audit_scratch"],
            },
            {
                "name": "order-deletes",
                "action": "review",
                "operations": ["delete"],
                "tables": ["public.orders"],
            },
        ],
        "defaultAction": "deny",
        "approval": {"reviewers": [{"group": "dba"}], "mode": "defer"},
    },
}


def policy_file(tmp_path: Path, name: str, policy: dict[str, Any]) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return str(path)


def pgwarden(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgwarden.cli", *args], capture_output=True, text=True, timeout=120
    )


def wait_for_outcomes(path: Path, sessions: int) -> None:
    """Outcome and session-end records are emitted after the client sees its answer."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = "".join(p.read_text() for p in sorted(path.parent.glob(path.name + "*")))
        if text.count('"event":"session.end"') >= sessions:
            return
        time.sleep(0.05)
    raise AssertionError(f"the proxy did not close {sessions} sessions in the audit log")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, pg: Any, proxy_thread: Any) -> Path:
    """An audit log of three agent sessions under RECORDED, written by the live proxy."""
    from fix_proxy import ProxyHandle, proxy_documents

    from pgwarden.proxy.main import start_proxy
    from pgwarden.resources import parse_documents

    tmp = tmp_path_factory.mktemp("policytest")
    audit = tmp / "audit.jsonl"
    spec = {"audit": {"path": str(audit), "rotateBytes": "4Ki", "keep": 20}}
    running = proxy_thread.call(
        start_proxy(parse_documents(proxy_documents(pg, extra=[RECORDED], proxy_spec=spec)))
    )
    proxy = ProxyHandle(running=running, runner=proxy_thread, pg=pg)
    try:
        # one psql session, one statement at a time (ON_ERROR_STOP off: refusals do not end it)
        script = (
            "\n".join(
                [
                    "SELECT count(*) FROM orders;",
                    "SELECT count(*) FROM customers;",
                    "INSERT INTO audit_scratch (payload) VALUES ('replay');",
                    "DELETE FROM orders WHERE id = 999;",  # review: refused with PW001 (no approval backend)
                    "DROP TABLE orders;",  # denied by defaultAction
                    "PREPARE contacts AS SELECT email FROM customers;",
                    "EXECUTE contacts;",
                ]
            )
            + "\n"
        )
        run = subprocess.run(
            ["psql", "-X"], input=script, capture_output=True, text=True, env=proxy.env(), timeout=60
        )
        assert "PW001" in run.stderr or "approval" in run.stderr, run.stderr
        assert "denied" in run.stderr
        # pg8000: the extended protocol, with parameter values in a Bind
        conn = pg8000.native.Connection(
            proxy.user, host=proxy.host, port=proxy.port, database="shop", password=proxy.password
        )
        assert conn.run("SELECT id FROM orders WHERE id = :i", i=2) is not None
        conn.run("SELECT count(*) FROM customers WHERE email LIKE :p", p="%@example.com")
        conn.close()
        # a second psql session that EXECUTEs a name it never prepared (denied by the engine)
        proxy.psql("-c", "EXECUTE contacts")
        wait_for_outcomes(audit, 3)
    finally:
        proxy.stop()
    assert len(list(tmp.glob("audit.jsonl.*"))) >= 1, "the test log should have rotated"
    return audit


def narrowed() -> dict[str, Any]:
    p = copy.deepcopy(RECORDED)
    p["spec"]["rules"][0]["tables"] = [
        "public.orders",
        "public.audit_scratch",
    ]  # customers no longer readable
    return p


def widened() -> dict[str, Any]:
    p = copy.deepcopy(RECORDED)
    p["spec"]["rules"][2]["action"] = "allow"  # order deletes without review
    return p


def test_a_narrowed_policy_reports_what_it_would_newly_deny_and_fails(recorded: Path, tmp_path: Path) -> None:
    cfg = policy_file(tmp_path, "narrowed", narrowed())
    r = pgwarden("policy", "test", "--config", cfg, "--audit", str(recorded), "--fail-on", "new-denials")
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    head, _, rest = out.partition("New denials (ran before, refused now):")
    assert rest, out
    denials = rest.split("\n\n")[0]
    # the psql read of customers and the pg8000 one (with its Bind value), the PREPARE whose body
    # is now denied, and the EXECUTE decided as that body
    assert "SELECT count(*) FROM customers;" in denials
    assert "SELECT count(*) FROM customers WHERE email LIKE $1" in denials
    assert "params: '%@example.com'" in denials
    assert "PREPARE contacts AS SELECT email FROM customers" in denials
    assert "EXECUTE contacts" in denials
    assert "allow by default/agents rule 1 (read)  ->  deny by default/agents defaultAction" in denials
    assert "4 statement(s) in 4 group(s)" in denials
    # what it still allows or already refused is not a change
    assert "SELECT count(*) FROM orders" not in denials
    assert "DROP TABLE" not in out
    assert "New allows" not in out
    assert "summary: 4 new-denial, 0 new-allow" in out
    # rotated files were read: the first statement sits in the oldest file
    assert "files read" in head
    # the same change does not fail a pipeline that only guards against widening
    r2 = pgwarden("policy", "test", "--config", cfg, "--audit", str(recorded), "--fail-on", "new-allows")
    assert r2.returncode == 0, r2.stdout + r2.stderr


def test_the_recorded_policy_reports_no_change(recorded: Path, tmp_path: Path) -> None:
    cfg = policy_file(tmp_path, "same", RECORDED)
    r = pgwarden("policy", "test", "--config", cfg, "--audit", str(recorded))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "New denials" not in r.stdout and "New allows" not in r.stdout
    assert "summary: 0 new-denial, 0 new-allow, 0 stricter, 0 looser, 0 mode" in r.stdout
    data = json.loads(pgwarden("policy", "test", "--config", cfg, "--audit", str(recorded), "--json").stdout)
    assert data["changes"] == [] and data["failed"] is False
    # every statement decision of the three sessions was replayed; the pg8000 Binds are not extra ones
    assert data["counts"]["replayed"] == 10
    assert data["counts"]["unchanged"] == 10


def test_a_widened_policy_reports_new_allows(recorded: Path, tmp_path: Path) -> None:
    cfg = policy_file(tmp_path, "widened", widened())
    r = pgwarden("policy", "test", "--config", cfg, "--audit", str(recorded), "--fail-on", "new-allows")
    assert r.returncode == 1, r.stdout + r.stderr
    _, _, rest = r.stdout.partition("New allows (held or refused before, run now):")
    assert "DELETE FROM orders WHERE id = 999" in rest
    assert (
        "review by default/agents rule 3 (order-deletes)  ->  allow by default/agents rule 3 (order-deletes)"
        in rest
    )
    assert "New denials" not in r.stdout
    assert (
        pgwarden(
            "policy", "test", "--config", cfg, "--audit", str(recorded), "--fail-on", "new-denials"
        ).returncode
        == 0
    )
    data = json.loads(pgwarden("policy", "test", "--config", cfg, "--audit", str(recorded), "--json").stdout)
    assert [
        (c["category"], c["example"]["sql"], c["old"]["action"], c["new"]["action"]) for c in data["changes"]
    ] == [("new-allow", "DELETE FROM orders WHERE id = 999;", "review", "allow")]
    assert data["failed"] is True


CASES = """\
defaults:
  identity: {user: cursor, groups: [ai-agents]}
cases:
  - name: agents read orders
    sql: SELECT * FROM orders
    expect: allow
    rule: default/agents rule read
  - name: EXECUTE runs what was prepared
    setup: ["PREPARE d(int) AS DELETE FROM orders WHERE id = $1"]
    sql: EXECUTE d(1)
    expect: review
  - name: agents may drop tables
    sql: DROP TABLE orders
    expect: allow
  - name: strangers read customers
    identity: {user: intern, groups: [interns]}
    sql: SELECT * FROM customers
    expect: deny
    rule: default/agents rule 1 (read)
"""


def test_unit_cases_pass_and_fail_with_a_diff_style_report(tmp_path: Path) -> None:
    cfg = policy_file(tmp_path, "recorded", RECORDED)
    cases = tmp_path / "cases.yaml"
    cases.write_text(CASES)
    r = pgwarden("policy", "test", "--config", cfg, "-f", str(cases))
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert f"FAIL {cases}:12: agents may drop tables" in out
    assert "  statement: DROP TABLE orders\n" in out
    assert "  - expected: allow\n  + got:      deny by default/agents defaultAction\n" in out
    assert f"FAIL {cases}:15: strangers read customers" in out
    assert "  - expected: deny by default/agents rule 1 (read)\n  + got:      deny by no policy\n" in out
    assert "(the rule differs)" in out
    assert "agents read orders" not in out and "EXECUTE runs" not in out
    assert out.rstrip().endswith("FAILED: 4 case(s), 2 passed, 2 failed")

    passing = "\n".join(CASES.splitlines()[:11]) + "\n"
    cases.write_text(passing)
    ok = pgwarden("policy", "test", "--config", cfg, "-f", str(cases))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip() == "ok: 2 case(s), 2 passed, 0 failed"


def test_a_malformed_cases_file_says_what_to_fix(tmp_path: Path) -> None:
    cfg = policy_file(tmp_path, "recorded", RECORDED)
    cases = tmp_path / "cases.yaml"
    cases.write_text("cases:\n  - sql: SELECT 1\n    expect: maybe\n")
    r = pgwarden("policy", "test", "--config", cfg, "-f", str(cases))
    assert r.returncode == 2
    assert "line 2: `expect` must be allow, review or deny, got 'maybe'" in r.stderr


def test_the_shipped_example_cases_pass() -> None:
    root = Path(__file__).resolve().parent.parent
    r = pgwarden(
        "policy",
        "test",
        "--config",
        str(root / "examples/access-policy.yaml"),
        "-f",
        str(root / "examples/policy-tests/orders-prod.yaml"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok: ")


def test_a_log_whose_chain_does_not_verify_is_replayed_with_a_note(recorded: Path, tmp_path: Path) -> None:
    import shutil

    copy_dir = tmp_path / "log"
    shutil.copytree(recorded.parent, copy_dir)
    newest = copy_dir / "audit.jsonl"
    lines = newest.read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if '"event":"statement"' in line)
    lines[first] = lines[first].replace('"protocol":', '"edited":true,"protocol":')
    newest.write_text("".join(lines))
    cfg = policy_file(tmp_path, "same", RECORDED)
    r = pgwarden("policy", "test", "--config", cfg, "--audit", str(newest))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"note: the audit chain of {newest} does not verify (1 problem(s)" in r.stdout
    assert "was edited" in r.stdout
    assert "replayed 10 statement(s)" in r.stdout
