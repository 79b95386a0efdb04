"""Shared AccessPolicy documents and helpers for the policy tests (pure: no database; no tests here)."""

from __future__ import annotations

from pgwarden.policy import PolicySet, SessionState, SubjectPolicy, load_policies
from pgwarden.resources import parse_documents
from pgwarden.subjects import Identity

AGENTS_POLICY = """
apiVersion: pgwarden.dev/v1alpha1
kind: AccessPolicy
metadata: {name: agents, namespace: shop}
spec:
  connectionRef: {name: shop}
  subjects: [{group: agents}]
  rules:
    - {name: no-pii, action: deny, operations: [select, insert, update, delete, merge, truncate, lock, ddl],
       tables: [public.customers]}
    - {action: allow, operations: [select], tables: [public.orders, public.customer_contacts, public.audit_scratch]}
    - {action: allow, operations: [insert, update, delete], tables: [public.audit_scratch], requireWhere: true}
    - {name: order-changes, action: review, operations: [insert, update, delete, merge], tables: [public.orders],
       requireWhere: true}
    - {action: allow, operations: [select, update], tables: [public.orders_id_seq]}
    - {action: allow, functions: [public.order_total]}
    - {action: allow, operations: [ddl], tables: [pg_temp.*]}
  defaultAction: deny
  limits: {maxRows: 100, statementTimeout: 30s}
  approval: {reviewers: [{group: dba}], timeout: 10m}
"""


def policy_set(text: str = AGENTS_POLICY) -> PolicySet:
    return load_policies(parse_documents(text, source="test.yaml"))


def agent(text: str = AGENTS_POLICY, groups: tuple[str, ...] = ("agents",)) -> SubjectPolicy:
    return policy_set(text).for_identity(Identity(subject="bot", groups=groups), "shop")


def decide(sql: str, subject: SubjectPolicy | None = None, session: SessionState | None = None):
    return (subject or agent()).decide(sql, session or SessionState())
