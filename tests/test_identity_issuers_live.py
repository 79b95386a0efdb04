"""Identities namespaced by issuer, through the live proxy, the local approval queue and the real CLI.

The proxy trusts two issuers: the cluster's service-account issuer and an OIDC IdP. A token of
the IdP that names the cluster's service account as `sub` and claims `groups: [dba]` is neither
that account (its policy, its approvals) nor in the `dba` group the policies mean.
"""

from __future__ import annotations

import json
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
CLUSTER = "https://kubernetes.default.svc.cluster.local"
IDP = "https://idp.example.com/realms/eng"
SA_SUBJECT = "system:serviceaccount:agents:cursor-agent"

AGENT_POLICY = {
    "apiVersion": API,
    "kind": "AccessPolicy",
    "metadata": {"name": "cursor", "namespace": "agents"},
    "spec": {
        "connectionRef": {"name": "shop"},
        "subjects": [{"serviceAccount": "agents/cursor-agent"}, {"group": f"{IDP}#ai-agents"}],
        "rules": [
            {"action": "allow", "operations": ["select"], "tables": ["public.orders"]},
            {"action": "review", "operations": ["insert"], "tables": ["public.audit_scratch"]},
        ],
        "approval": {"reviewers": [{"group": "dba"}], "timeout": "60s", "mode": "defer"},
    },
}
DBA_POLICY = {  # meant for the static users in group dba (and, by its prefixed name, the IdP's dba group)
    "apiVersion": API,
    "kind": "AccessPolicy",
    "metadata": {"name": "dba", "namespace": "agents"},
    "spec": {
        "connectionRef": {"name": "shop"},
        "subjects": [{"group": "dba"}, {"group": f"{IDP}#db-admins"}],
        "rules": [{"action": "allow", "operations": ["select"], "tables": ["public.customers"]}],
    },
}


@pytest.fixture(scope="module")
def keys() -> dict[str, rsa.RSAPrivateKey]:
    return {iss: rsa.generate_private_key(public_exponent=65537, key_size=2048) for iss in (CLUSTER, IDP)}


@pytest.fixture
def two_issuers(make_proxy: Any, tmp_path: Path, keys: dict[str, Any]) -> tuple[Any, Path]:
    oidc = []
    for i, (iss, key) in enumerate(keys.items()):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        jwk.update(kid=f"k{i}", alg="RS256", use="sig")
        (tmp_path / f"jwks{i}.json").write_text(json.dumps({"keys": [jwk]}))
        oidc.append({"issuer": iss, "audience": "pgwarden", "jwksFile": str(tmp_path / f"jwks{i}.json")})
    db = tmp_path / "approvals.db"
    spec = {
        "identity": {"oidc": oidc},
        "users": [{"name": "dba-carol", "password": "carol-pw", "groups": ["dba"]}],
        "approvals": {"backend": "local", "path": str(db), "allowProxyUserDecisions": True},
        "audit": {"path": str(tmp_path / "audit.jsonl")},
    }
    return make_proxy(extra=[AGENT_POLICY, DBA_POLICY], proxy_spec=spec), db


def token(keys: dict[str, Any], issuer: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": issuer, "aud": "pgwarden", "iat": now, "exp": now + 300, **claims}
    kid = "k0" if issuer == CLUSTER else "k1"
    return jwt.encode(body, keys[issuer], algorithm="RS256", headers={"kid": kid})


def service_account_token(keys: dict[str, Any]) -> str:
    return token(
        keys,
        CLUSTER,
        sub=SA_SUBJECT,
        **{
            "kubernetes.io": {
                "namespace": "agents",
                "serviceaccount": {"name": "cursor-agent"},
                "pod": {"name": "cursor-agent-7d9f"},
            }
        },
    )


def impostor_token(keys: dict[str, Any]) -> str:
    """Anyone the IdP knows can get this: the account's subject as `sub`, and `groups: [dba]`."""
    return token(keys, IDP, sub=SA_SUBJECT, groups=["dba", "ai-agents"])


def connect(proxy: Any, user: str, password: str) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        user, host=proxy.host, port=proxy.port, database="shop", password=password
    )


def sqlstate(conn: pg8000.native.Connection, sql: str) -> str:
    with pytest.raises(pg8000.native.DatabaseError) as e:
        conn.run(sql)
    return str(e.value.args[0]["C"])


def ran(pg: Any, mark: int, marker: str) -> int:
    return sum(1 for line in pg.log_since(mark).splitlines() if "statement:" in line and marker in line)


def approvals(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgwarden.cli", "approvals", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_another_issuers_groups_dba_do_not_get_the_dba_policy(
    two_issuers: tuple[Any, Path], keys: Any, pg: Any
) -> None:
    proxy, _ = two_issuers
    carol = connect(proxy, "dba-carol", "carol-pw")  # the dba the policy means
    assert carol.run("SELECT count(*) FROM customers")[0][0] > 0
    carol.close()
    mark = pg.log_position()
    impostor = connect(proxy, "x", impostor_token(keys))
    assert sqlstate(impostor, "SELECT email FROM customers /* impostor-dba */") == "42501"
    impostor.close()
    assert ran(pg, mark, "impostor-dba") == 0
    # the IdP's own groups are named with its prefix
    admin = connect(proxy, "x", token(keys, IDP, sub="erin", groups=["db-admins"]))
    assert admin.run("SELECT count(*) FROM customers /* idp-admin */")[0][0] > 0
    admin.close()


def test_another_issuer_cannot_consume_the_service_accounts_approval(
    two_issuers: tuple[Any, Path], keys: Any, pg: Any, tmp_path: Path
) -> None:
    proxy, db = two_issuers
    sql = "INSERT INTO audit_scratch (payload) VALUES ('issuer-bound-approval')"
    mark = pg.log_position()
    agent = connect(proxy, "x", service_account_token(keys))
    assert agent.run("SELECT count(*) FROM orders") == [[20]]
    assert sqlstate(agent, sql) == "PW001"
    (req,) = [r for r in json.loads(approvals(db, "list", "--json").stdout) if r["state"] == "pending"]
    assert approvals(db, "approve", req["id"], "--as", "dba-alice").returncode == 0
    # the same `sub` from the IdP, under the same policy (its ai-agents group): the approval is not
    # its to use; its statement waits for an approval of its own and does not run
    impostor = connect(proxy, "x", impostor_token(keys))
    assert sqlstate(impostor, sql) == "PW001"
    impostor.close()
    assert ran(pg, mark, "issuer-bound-approval") == 0
    mine = [r for r in json.loads(approvals(db, "list", "--json").stdout) if r["state"] == "pending"]
    assert len(mine) == 1 and mine[0]["requester"] == f"{IDP}#{SA_SUBJECT}"
    # the account itself still has its approval, once
    agent.run(sql)
    assert ran(pg, mark, "issuer-bound-approval") == 1
    agent.close()
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    starts = [
        e["identity"] for e in events if e["event"] == "session.start" and e["identity"]["method"] == "jwt"
    ]
    assert {"subject": SA_SUBJECT, "issuer": CLUSTER}.items() <= starts[0].items()
    assert any(
        s["subject"] == f"{IDP}#{SA_SUBJECT}" and s["groups"] == [f"{IDP}#dba", f"{IDP}#ai-agents"]
        for s in starts
    )
