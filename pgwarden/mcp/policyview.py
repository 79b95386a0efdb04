"""What the agent may do, read from the policies the proxy runs with, so a model can plan.

When `pgwarden mcp --config` is given the proxy's YAML (AccessPolicy, MaskingRule, ProxyConfig),
the server resolves the agent's identity with the proxy's own code (the token verified by
`TokenAuthenticator`, the pod identity, a static user) and asks the proxy's policy engine
(`SubjectPolicy.decide`) and masking rules. None of this lets anything through: it explains,
marks masked columns and leaves out tables the agent has no access to; the proxy decides every
statement again when it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pgwarden.errors import AgentError
from pgwarden.masking.ruleset import MaskingSet, load_masking
from pgwarden.policy.engine import SessionState, SubjectPolicy
from pgwarden.policy.policyset import PolicySet, load_policies
from pgwarden.resources import Document, of_kind
from pgwarden.subjects import Identity, any_matches

ADVISORY = (
    "Advisory: the decision the policy gives now, without running the statement. The proxy decides "
    "again when the statement runs."
)
OPERATIONS = ("select", "insert", "update", "delete")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def probe_sql(operation: str, schema: str, table: str) -> str:
    """A statement that performs exactly `operation` on the table (never run, only decided)."""
    t = f"{quote_ident(schema)}.{quote_ident(table)}"
    return {
        "select": f"SELECT * FROM {t}",
        "insert": f"INSERT INTO {t} DEFAULT VALUES",
        "update": f'UPDATE {t} SET "_" = NULL WHERE false',
        "delete": f"DELETE FROM {t} WHERE false",
    }[operation]


def _masking_without_key(docs: list[Document]) -> MaskingSet:
    """The MaskingRules' columns and exemptions. The hash key is the proxy's secret and never needed
    here (the proxy masks), so a placeholder stands in for hashKeyEnv / hashKeyFile."""
    placeholder = {"PGWARDEN_MCP_NO_HASH_KEY": "0" * 32}
    stripped = []
    for d in docs:
        if d.kind == "MaskingRule":
            spec = {k: v for k, v in d.spec.items() if k not in ("hashKeyEnv", "hashKeyFile")}
            d = replace(d, spec={**spec, "hashKeyEnv": "PGWARDEN_MCP_NO_HASH_KEY"})
        stripped.append(d)
    return load_masking(stripped, placeholder)


@dataclass(frozen=True)
class PolicyView:
    """The policies and masking rules of one connection, and how the proxy identifies callers."""

    policies: PolicySet
    masking: MaskingSet
    connection: str
    proxy_spec: Mapping[str, Any]

    @classmethod
    def from_documents(cls, docs: list[Document]) -> PolicyView | None:
        if not of_kind(docs, "AccessPolicy"):
            return None
        proxies = of_kind(docs, "ProxyConfig")
        spec = proxies[0].spec if proxies else {}
        ref = (spec.get("connectionRef") or {}).get("name")
        policies = load_policies(docs)
        names = [d.name for d in of_kind(docs, "DatabaseConnection")] or list(policies.connections)
        connection = ref or (names[0] if len(names) == 1 else "")
        return cls(policies, _masking_without_key(docs), connection, spec)

    async def identity(self, user: str, credential: str | None) -> Identity:
        """The identity the proxy gives this credential, by the proxy's own rules (proxy.auth)."""
        from pgwarden.identity import TokenAuthenticator, parse_identity_config, workload_from_env
        from pgwarden.proxy.auth import pod_identity

        users = {str(u.get("name")): u for u in self.proxy_spec.get("users") or [] if isinstance(u, Mapping)}
        if credential is None and self.proxy_spec.get("podIdentity") and user not in users:
            return pod_identity(workload_from_env())
        if user in users:
            return Identity(subject=user, groups=tuple(users[user].get("groups") or ()), method="static")
        if not credential:
            raise AgentError("no token to identify this agent", sqlstate="28000")
        auth = TokenAuthenticator(parse_identity_config(self.proxy_spec))
        try:
            return await auth.authenticate(credential)
        finally:
            await auth.close()

    def planner(self, identity: Identity, server_version: int) -> Planner:
        return Planner(self, identity, self.policies.for_identity(identity, self.connection), server_version)


@dataclass
class Planner:
    """One identity's view: explain, per-table access, masked columns, a summary."""

    view: PolicyView
    identity: Identity
    subject: SubjectPolicy
    server_version: int

    def decide(self, sql: str) -> Any:
        return self.subject.decide(sql, SessionState(server_version=self.server_version))

    def explain(self, sql: str) -> dict[str, Any]:
        d = self.decide(sql).to_json()
        out: dict[str, Any] = {"status": "ok", "decision": d["action"], "enforced": d["enforce"]}
        for key in ("rule", "message", "hint", "sqlstate"):
            if d.get(key):
                out[key] = d[key]
        out["accesses"] = d["accesses"]
        if d["approval"]:
            out["approval"] = d["approval"]
        out["identity"] = self.identity.as_dict()
        out["note"] = ADVISORY
        return out

    def reviewers(self, sql: str) -> list[str]:
        approval = self.decide(sql).approval
        return [str(r) for r in approval.reviewers] if approval else []

    def table_access(self, schema: str, table: str) -> dict[str, str]:
        return {op: self.decide(probe_sql(op, schema, table)).action for op in OPERATIONS}

    def masked_columns(self, schema: str, table: str) -> dict[str, str]:
        masked: dict[str, str] = {}
        for rule in self.view.masking.rules:
            if rule.connection != self.view.connection or any_matches(rule.exempt, self.identity):
                continue
            for c in rule.columns:
                if (c.schema, c.table) == (schema, table):
                    masked[c.column] = c.strategy
        return masked

    def summary(self) -> dict[str, Any]:
        """The rules that apply to this identity: what it may read, change with or without review."""
        policies = []
        for p in self.subject.policies:
            policies.append(
                {
                    "policy": f"{p.namespace}/{p.name}",
                    "mode": p.mode,
                    "rules": [
                        {
                            "rule": r.name or f"rule {r.index}",
                            "action": r.action,
                            "operations": sorted(r.operations),
                            **({"tables": [str(t) for t in r.tables]} if r.tables is not None else {}),
                            **(
                                {"functions": [str(f) for f in r.functions]}
                                if r.functions is not None
                                else {}
                            ),
                            **({"requireWhere": True} if r.require_where else {}),
                        }
                        for r in p.rules
                    ],
                    "defaultAction": p.default_action,
                    "systemCatalogs": p.system_catalogs,
                    "limits": p.limits.to_json(),
                    **({"approval": p.approval.to_json()} if p.approval else {}),
                }
            )
        masked = []
        for rule in self.view.masking.rules:
            if rule.connection == self.view.connection and not any_matches(rule.exempt, self.identity):
                masked += [
                    {"table": f"{c.schema}.{c.table}", "column": c.column, "strategy": c.strategy}
                    for c in rule.columns
                ]
        return {
            "identity": self.identity.as_dict(),
            "connection": self.view.connection,
            "policies": policies,
            "maskedColumns": masked,
            "note": (
                "No AccessPolicy names this identity: every statement is refused."
                if not policies
                else "Statements outside these rules get the defaultAction. Values in masked columns come back "
                "masked; content detectors mask e-mails, card numbers and the like anywhere."
            ),
        }
