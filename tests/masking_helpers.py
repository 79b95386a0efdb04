"""Shared fixtures for the masking tests: the shop catalog and a rule over it."""

from __future__ import annotations

from pgwarden.masking import Catalog, load_masking
from pgwarden.resources import parse_documents
from pgwarden.subjects import Identity

HASH_KEY = "k" * 32

RULE = """
apiVersion: pgwarden.dev/v1alpha1
kind: MaskingRule
metadata: {{name: shop-pii, namespace: agents}}
spec:
  connectionRef: {{name: shop}}
  columns:
    - {{table: public.customers, column: email, strategy: email}}
    - {{table: public.customers, column: ssn, strategy: redact}}
    - {{table: public.customers, column: card_number, strategy: last4}}
    - {{table: public.customers, column: phone, strategy: hash}}
  detectors: [email, us_ssn, credit_card, phone, iban]
  derived: {derived}
  wholeRow: {whole_row}
  allowInPredicates: {allow}
  exemptSubjects: [{{group: privacy-officers}}]
  hashKeyEnv: SHOP_HASH_KEY
"""

AGENT = Identity("cursor", ("ai-agents",))
OFFICER = Identity("pat", ("privacy-officers",))

SHOP_TABLES = {
    "public.customers": [("id", 23), "name", "email", "ssn", "card_number", "phone", "notes", ("created_at", 1184)],
    "public.orders": [("id", 23), ("customer_id", 23), "status", ("total_cents", 23), ("created_at", 1184)],
    "public.audit_scratch": [("id", 23), "payload"],
}
SHOP_VIEWS = {"public.customer_contacts": ("SELECT id, name, email, phone FROM public.customers",
                                           ["id", "name", "email", "phone"])}

SECRETS = [
    "ada@example.com", "grace@example.org", "alan@example.net", "kj@example.com", "edsger@example.nl",
    "123-45-6789", "234-56-7890", "345-67-8901", "456-78-9012", "567-89-0123",
    "4111111111111111", "5500005555555559", "340000000000009", "6011000000000004", "3530111333300000",
    "+1 415 555 0101", "+1 415 555 0102", "+44 20 7946 0958",
]


def shop_catalog() -> Catalog:
    return Catalog.from_dicts(SHOP_TABLES, SHOP_VIEWS, oids={"public.customers": 16390})


def masking(derived: str = "redact", whole_row: str = "redact", allow: bool = False):  # type: ignore[no-untyped-def]
    docs = parse_documents(RULE.format(derived=derived, whole_row=whole_row, allow=str(allow).lower()))
    return load_masking(docs, env={"SHOP_HASH_KEY": HASH_KEY}).for_identity(AGENT, "shop")
