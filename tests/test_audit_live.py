"""The audit trail, recordings and token identities through the live proxy and a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pg8000.native
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

API = "pgwarden.dev/v1alpha1"
POLICY = {
    "apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "agents"},
    "spec": {
        "connectionRef": {"name": "shop"},
        "subjects": [{"group": "ai-agents"}],
        "rules": [
            {"action": "allow", "operations": ["select"], "tables": ["public.orders", "public.customers"]},
            {"action": "review", "operations": ["delete"], "tables": ["public.orders"]},
        ],
        "defaultAction": "deny",
        "approval": {"reviewers": [{"group": "dba"}], "mode": "defer"},
    },
}


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def statements(recs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["sql"]: r for r in recs if r["event"] == "statement"}


def pgwarden(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgwarden.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def audited(make_proxy: Any, tmp_path: Path) -> Any:
    spec = {"audit": {"path": str(tmp_path / "audit.jsonl")}, "recording": {"dir": str(tmp_path / "rec")}}
    return make_proxy(extra=[POLICY], proxy_spec=spec)


def test_every_statement_has_a_record_naming_the_caller_and_the_decision(audited: Any, tmp_path: Path) -> None:
    assert audited.psql("-c", "SELECT count(*) FROM orders").returncode == 0
    denied = audited.psql("-c", "DROP TABLE orders")
    held = audited.psql("-c", "DELETE FROM orders WHERE id = 1")
    assert "42501" in denied.stderr or "denied" in denied.stderr
    assert "approval" in held.stderr
    recs = read_records(tmp_path / "audit.jsonl")
    by_sql = statements(recs)
    allowed = by_sql["SELECT count(*) FROM orders"]
    assert allowed["decision"]["action"] == "allow"
    assert allowed["identity"]["subject"] == "agent" and "ai-agents" in allowed["identity"]["groups"]
    assert allowed["decision"]["rule"] == "default/agents rule 1"
    assert by_sql["DROP TABLE orders"]["decision"]["action"] == "deny"
    assert by_sql["DROP TABLE orders"]["refusal"]["sqlstate"] == "42501"
    assert by_sql["DELETE FROM orders WHERE id = 1"]["decision"]["action"] == "review"
    assert by_sql["DELETE FROM orders WHERE id = 1"]["refusal"]["sqlstate"] == "PW001"
    outcomes = [r for r in recs if r["event"] == "statement.outcome"]
    assert any(o.get("tag") == "SELECT 1" and o.get("rows") == 1 for o in outcomes)
    assert {"session.start", "session.end"} <= {r["event"] for r in recs}


def test_the_chain_verifies_and_an_edit_is_reported(audited: Any, tmp_path: Path) -> None:
    audited.psql("-c", "SELECT count(*) FROM orders")
    audited.psql("-c", "SELECT count(*) FROM customers")
    path = tmp_path / "audit.jsonl"
    ok = pgwarden("audit", "verify", str(path))
    assert ok.returncode == 0, ok.stderr
    assert "chain intact" in ok.stdout
    lines = path.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if "customers" in line)
    lines[i] = lines[i].replace("customers", "orders")  # someone rewrites history
    path.write_text("\n".join(lines) + "\n")
    bad = pgwarden("audit", "verify", str(path))
    assert bad.returncode == 1
    assert f":{i + 1}" in bad.stderr


def test_verify_refuses_rewritten_lines_deleted_heads_and_a_cut_tail(make_proxy: Any, tmp_path: Path) -> None:
    """The attacks on a rotated log the proxy wrote, each caught by the real CLI."""
    path = tmp_path / "audit.jsonl"
    proxy = make_proxy(extra=[POLICY], proxy_spec={"audit": {"path": str(path), "rotateBytes": 4000, "keep": 2}})
    for i in range(12):
        proxy.psql("-c", f"SELECT count(*) FROM orders WHERE id > {i}")
    proxy.psql("-c", "DELETE FROM orders WHERE id = 8 OR id > 0")
    proxy.stop()
    rotated = sorted(tmp_path.glob("audit.jsonl.*"))
    assert [f.name for f in rotated] == ["audit.jsonl.1", "audit.jsonl.2"]  # keep: 2, more rotations than that
    for f in [*rotated, path]:  # every file starts with the marker that explains the files before it
        assert json.loads(f.read_bytes().splitlines()[0])["event"] == "audit.rotation"
    ok = pgwarden("audit", "verify", str(path))
    assert ok.returncode == 0, ok.stderr
    assert "rotated away" in ok.stdout
    head = ok.stdout.split("head ")[1].strip()
    assert len(head) == 64
    pristine = {f: f.read_bytes() for f in [*rotated, path]}

    def restore() -> None:
        for f, data in pristine.items():
            f.write_bytes(data)

    # 1. the reviewed-and-denied statement re-encoded so a grep for it finds nothing
    data = path.read_bytes()
    assert b"OR id > 0" in data
    path.write_bytes(data.replace(b"OR id > 0", b"\\u004fR id \\u003e 0"))
    bad = pgwarden("audit", "verify", str(path))
    assert bad.returncode == 1 and "not byte for byte what the writer wrote" in bad.stderr
    restore()
    # 2. the oldest rotated file deleted: rotation did not do that
    (tmp_path / "audit.jsonl.2").unlink()
    bad = pgwarden("audit", "verify", str(path))
    assert bad.returncode == 1 and "older files were deleted, not rotated away" in bad.stderr
    restore()
    # 3. the oldest records of the oldest file deleted (its marker with them)
    old = (tmp_path / "audit.jsonl.2").read_bytes().splitlines(keepends=True)
    (tmp_path / "audit.jsonl.2").write_bytes(b"".join(old[2:]))
    bad = pgwarden("audit", "verify", str(path))
    assert bad.returncode == 1 and "no rotation marker" in bad.stderr
    restore()
    # 4. the newest records cut off: only the head kept off the node shows it
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-3]))
    assert pgwarden("audit", "verify", str(path)).returncode == 0
    bad = pgwarden("audit", "verify", "--expect-head", head, str(path))
    assert bad.returncode == 1 and "is not in the chain" in bad.stderr
    restore()
    assert pgwarden("audit", "verify", "--expect-head", head, str(path)).returncode == 0


def test_unwritable_audit_refuses_with_pw004_and_nothing_runs(make_proxy: Any, pg: Any, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores permissions: make the path a directory, which cannot be opened as a file
        target = tmp_path / "audit-dir"
        target.mkdir()
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "audit.jsonl"
    proxy = make_proxy(extra=[POLICY], proxy_spec={"audit": {"path": str(target)}})
    mark = pg.log_position()
    with pytest.raises(pg8000.native.DatabaseError) as e:
        pg8000.native.Connection(proxy.user, host=proxy.host, port=proxy.port, database="shop",
                                 password=proxy.password).run("SELECT 'pw004-marker' FROM orders")
    assert e.value.args[0]["C"] == "PW004"
    assert "pw004-marker" not in pg.log_since(mark)


def test_replay_shows_what_the_agent_saw(audited: Any, tmp_path: Path) -> None:
    audited.psql("-c", "SELECT id, status FROM orders ORDER BY id LIMIT 2")
    audited.psql("-c", "DROP TABLE orders")
    recs = read_records(tmp_path / "audit.jsonl")
    sessions = [r["session"] for r in recs if r["event"] == "session.start"]
    out = pgwarden("replay", sessions[0], "--dir", str(tmp_path / "rec"))
    assert out.returncode == 0, out.stderr
    assert "SELECT id, status FROM orders" in out.stdout
    assert "shipped" in out.stdout or "new" in out.stdout
    denied = pgwarden("replay", sessions[1], "--dir", str(tmp_path / "rec"), "--json")
    events = json.loads(denied.stdout)["events"]
    assert any("42501" in json.dumps(ev) for ev in events)


# -- identity tokens ------------------------------------------------------------------------------
ISSUER = "https://idp.example.com/realms/eng"


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def token_proxy(make_proxy: Any, tmp_path: Path, signing_key: Any) -> Any:
    jwk = RSAAlgorithm.to_jwk(signing_key.public_key(), as_dict=True)
    jwk.update(kid="k1", alg="RS256", use="sig")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    spec = {
        "audit": {"path": str(tmp_path / "audit.jsonl")},
        "identity": {"oidc": [{"issuer": ISSUER, "audience": "pgwarden", "jwksFile": str(tmp_path / "jwks.json")}]},
    }
    # the IdP's groups are namespaced by its URL (identity.oidc[].groupsPrefix's default)
    policy = json.loads(json.dumps(POLICY))
    policy["spec"]["subjects"].append({"group": f"{ISSUER}#ai-agents"})
    return make_proxy(extra=[policy], proxy_spec=spec)


def _token(key: Any, **over: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "pgwarden", "sub": "ci-job-42", "groups": ["ai-agents"], "iat": now, "exp": now + 300}
    claims.update(over)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


def test_a_jwt_password_identifies_the_caller_in_the_audit(token_proxy: Any, tmp_path: Path, signing_key: Any) -> None:
    conn = pg8000.native.Connection("ci-job-42", host=token_proxy.host, port=token_proxy.port, database="shop",
                                    password=_token(signing_key))
    assert conn.run("SELECT count(*) FROM orders") == [[20]]
    conn.close()
    rec = statements(read_records(tmp_path / "audit.jsonl"))["SELECT count(*) FROM orders"]
    assert rec["identity"]["subject"] == f"{ISSUER}#ci-job-42"
    assert rec["identity"]["method"] == "jwt"
    assert rec["identity"]["issuer"] == ISSUER


def test_an_expired_token_is_refused_and_audited(token_proxy: Any, tmp_path: Path, signing_key: Any, pg: Any) -> None:
    mark = pg.log_position()
    with pytest.raises(pg8000.native.DatabaseError) as e:
        pg8000.native.Connection("ci-job-42", host=token_proxy.host, port=token_proxy.port, database="shop",
                                 password=_token(signing_key, exp=int(time.time()) - 3600))
    assert e.value.args[0]["C"] == "28P01"
    assert "expired" in e.value.args[0]["M"]
    failures = [r for r in read_records(tmp_path / "audit.jsonl") if r["event"] == "auth.failure"]
    assert failures and "expired" in failures[-1]["reason"]
    assert "connection authorized" not in pg.log_since(mark)


def test_a_recording_without_an_audit_log_still_shows_the_statements(make_proxy: Any, tmp_path: Path) -> None:
    proxy = make_proxy(extra=[POLICY], proxy_spec={"recording": {"dir": str(tmp_path / "rec")}})
    proxy.psql("-c", "SELECT id, status FROM orders ORDER BY id LIMIT 1")
    proxy.psql("-c", "DROP TABLE orders")
    # psql has exited; the proxy closes each recording when it sees the session end
    deadline = time.monotonic() + 10
    while True:
        files = list((tmp_path / "rec").glob("*.jsonl"))
        texts = "".join(p.read_text() for p in files)
        if (len(files) == 2 and texts.count('"k":"end"') == 2) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "SELECT id, status FROM orders" in texts and "DROP TABLE orders" in texts
    assert "42501" in texts


def test_recordings_show_text_and_binary_results_as_the_agent_received_them(make_proxy: Any, tmp_path: Path) -> None:
    """The same rows asked for in text (psql) and in binary (psycopg's binary cursor, whose
    Describe comes in the same batch as its Execute) are recorded as the agent got them: text as
    text, binary columns as \\x hex."""
    import psycopg

    proxy = make_proxy(extra=[POLICY], proxy_spec={"recording": {"dir": str(tmp_path / "rec")}})
    sql = "SELECT id, status FROM orders ORDER BY id LIMIT 2"
    proxy.psql("-c", sql)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        got = conn.cursor(binary=True).execute(sql).fetchall()
    deadline = time.monotonic() + 10
    results: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        files = list((tmp_path / "rec").glob("*.jsonl"))
        events = [json.loads(line) for p in files for line in p.read_text().splitlines() if line.strip()]
        if sum(ev.get("k") == "end" for ev in events) == 2:
            results = [ev for ev in events if ev.get("k") == "result" and ev.get("rows")]
            break
        time.sleep(0.05)
    assert len(results) == 2, results
    rows = sorted((ev["rows"] for ev in results), key=lambda r: r[0][0].startswith("\\x"))
    text_rows, binary_rows = rows
    assert text_rows == [[str(i), s] for i, s in got]
    # binary results as the bytes on the wire: int4 is four big-endian bytes, text its UTF-8
    assert binary_rows == [["\\x" + i.to_bytes(4, "big").hex(), "\\x" + s.encode().hex()] for i, s in got]


def _recorded(directory: Path, sessions: int) -> list[dict[str, Any]]:
    """Every event of `sessions` closed recordings in `directory` (waits for their end lines)."""
    deadline = time.monotonic() + 10
    while True:
        events = [json.loads(line) for p in sorted(directory.glob("*.jsonl"))
                  for line in p.read_text().splitlines() if line.strip()]
        if sum(ev.get("k") == "end" for ev in events) >= sessions or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def test_replay_shows_the_values_of_every_execution_of_a_prepared_statement(make_proxy: Any, tmp_path: Path) -> None:
    """An agent that prepares `... WHERE id = $1` once and runs it with many values: the replay
    shows which value each run had and what it returned, not the text once and results without
    their values (the auditor asks "which rows did it read?")."""
    import psycopg

    proxy = make_proxy(extra=[POLICY], proxy_spec={"recording": {"dir": str(tmp_path / "rec")}})
    sql = "SELECT id, status FROM orders WHERE id = %s"
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for wanted in ("1", "2", 3):  # Parse once, then Bind/Execute with each value
            conn.execute(sql, (wanted,), prepare=True).fetchall()
    conn2 = pg8000.native.Connection(proxy.user, host=proxy.host, port=proxy.port, database="shop",
                                     password=proxy.password)
    conn2.run("SELECT id FROM orders WHERE id = :v", v=2)  # unnamed: Parse and Bind every time
    conn2.close()
    events = _recorded(tmp_path / "rec", 2)
    runs = [(ev.get("sql"), ev.get("params")) for ev in events if ev.get("k") == "query"]
    assert ("SELECT id, status FROM orders WHERE id = $1", ["1"]) in runs, runs
    assert ("SELECT id, status FROM orders WHERE id = $1", ["2"]) in runs, runs
    # psycopg sends an int in binary: shown as the bytes, as the audit log shows it
    assert ("SELECT id, status FROM orders WHERE id = $1", ["\\x0003"]) in runs, runs
    assert ("SELECT id FROM orders WHERE id = $1", ["2"]) in runs, runs
    # in each session every run's query line comes right before its own result: the Parse is no run
    for path in (tmp_path / "rec").glob("*.jsonl"):
        kinds = [ev["k"] for ev in map(json.loads, path.read_text().splitlines()) if ev["k"] in ("query", "result")]
        assert kinds and kinds == ["query", "result"] * (len(kinds) // 2), kinds
    texts = [pgwarden("replay", ev["session"], "--dir", str(tmp_path / "rec")) for ev in events if ev.get("k") == "session"]
    assert all(t.returncode == 0 for t in texts), [t.stderr for t in texts]
    timeline = "".join(t.stdout for t in texts)
    assert timeline.count("SELECT id, status FROM orders WHERE id = $1") == 3, timeline
    for value in ("1", "2", "\\\\x0003"):
        assert f'params: ["{value}"]' in timeline, timeline


def test_each_run_of_a_prepared_statement_is_timed_from_its_own_bind(audited: Any, tmp_path: Path) -> None:
    """A prepared statement run now and again later: each run's outcome (the audit's durationMs,
    the recording's ms) is the time that run took, not the time since the statement was parsed
    (an auditor looking for slow statements would find every later run of a fast one)."""
    import psycopg

    with psycopg.connect(audited.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for wanted in ("1", "2", "3"):
            conn.execute("SELECT id, status FROM orders WHERE id = %s", (wanted,), prepare=True).fetchall()
            time.sleep(0.6)
    recs = read_records(tmp_path / "audit.jsonl")
    runs = [r for r in recs if r["event"] == "statement" and r.get("phase") == "bind"]
    assert [r["params"] for r in runs] == [["1"], ["2"], ["3"]]
    outcomes = [r for r in recs if r["event"] == "statement.outcome" and r["stmt"] == runs[0]["stmt"]]
    assert len(outcomes) == 3 and all(o["tag"] == "SELECT 1" for o in outcomes)
    # the third run started 1.2 s after the Parse; it took milliseconds
    assert all(o["durationMs"] < 500 for o in outcomes), [o["durationMs"] for o in outcomes]
    results = [ev for ev in _recorded(tmp_path / "rec", 1) if ev.get("k") == "result" and ev.get("tag") == "SELECT 1"]
    assert len(results) == 3 and all(ev["ms"] < 500 for ev in results), results


def test_bound_values_are_scrubbed_by_the_detectors_before_they_are_audited(make_proxy: Any, tmp_path: Path) -> None:
    """An agent that binds a secret as a parameter value (an SSN to look a customer up, an email
    in a note): the audit record of that run shows what kind of value it was, never the value;
    ordinary values (ids, words, numbers too short to be anything) are kept as sent, since the
    auditor needs exactly what ran."""
    from masking_live_helpers import live_documents

    proxy = make_proxy(extra=live_documents(), proxy_spec={"audit": {"path": str(tmp_path / "audit.jsonl")}})
    conn = pg8000.native.Connection(proxy.user, host=proxy.host, port=proxy.port, database="shop",
                                    password=proxy.password)
    sent = ["123-45-6789", "write to ada@example.com", "42", "ssn 987-65-4321 and 4111111111111111", "plain words"]
    for value in sent:
        conn.run("SELECT count(*) FROM customers WHERE name = :v", v=value)
    conn.close()
    runs = [r for r in read_records(tmp_path / "audit.jsonl")
            if r["event"] == "statement" and "customers WHERE name" in r["sql"] and "params" in r]
    assert [r["params"] for r in runs] == [
        ["[redacted:us_ssn]"], ["write to [redacted:email]"], ["42"],
        ["ssn [redacted:us_ssn] and [redacted:credit_card]"], ["plain words"],
    ]
    text = (tmp_path / "audit.jsonl").read_text()
    assert "123-45-6789" not in text and "ada@example.com" not in text and "4111111111111111" not in text
