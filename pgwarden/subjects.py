"""Who is calling, and whether a policy's subject list names them.

An `Identity` is produced by the proxy's authentication (static user, OIDC JWT, Kubernetes
service-account token) and carried into every decision and audit record. Subject references
(`{group: dba}`, `{user: alice}`, `{serviceAccount: agents/cursor-agent}`) appear in
AccessPolicy.subjects, MaskingRule.exemptSubjects and approval reviewers.

Names from tokens arrive namespaced by their issuer (pgwarden.identity.claims): an OIDC
provider's `sub: alice` is `https://idp#alice` by default, so references compare plain strings
and `{group: dba}` never matches another issuer's `groups: [dba]`. `issuer` stays on the
identity so approvals can be bound to it as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pgwarden.resources import Document

SUBJECT_KEYS = ("group", "user", "serviceAccount")


@dataclass(frozen=True)
class Workload:
    """Where the proxy runs (downward API in a pod); empty when standalone."""

    namespace: str = ""
    pod: str = ""
    service_account: str = ""
    node: str = ""

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    subject: str
    groups: tuple[str, ...] = ()
    issuer: str = ""
    # `namespace/name` when the caller is a Kubernetes service account
    service_account: str = ""
    # how the caller proved it: "static" (development only), "jwt", "tokenreview"
    method: str = "static"
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"subject": self.subject, "groups": list(self.groups), "method": self.method}
        if self.issuer:
            out["issuer"] = self.issuer
        if self.service_account:
            out["serviceAccount"] = self.service_account
        return out


@dataclass(frozen=True)
class SubjectRef:
    """One entry of a subjects list: exactly one of group, user or serviceAccount."""

    group: str = ""
    user: str = ""
    service_account: str = ""

    def matches(self, who: Identity) -> bool:
        if self.group:
            return self.group in who.groups
        if self.user:
            return self.user == who.subject
        if self.service_account:
            return self.service_account == who.service_account
        return False

    def __str__(self) -> str:
        if self.group:
            return f"group:{self.group}"
        if self.user:
            return f"user:{self.user}"
        return f"serviceAccount:{self.service_account}"


def parse_subjects(doc: Document, raw: Any, path: str) -> tuple[SubjectRef, ...]:
    """Parse a subjects list, e.g. `[{group: ai-agents}, {serviceAccount: agents/cursor}]`."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise doc.error(path, "must be a list of {group|user|serviceAccount: NAME}")
    refs = []
    for i, item in enumerate(raw):
        p = f"{path}[{i}]"
        if not isinstance(item, Mapping) or len(item) != 1:
            raise doc.error(p, "must have exactly one of group, user, serviceAccount")
        (key, value), = item.items()
        if key not in SUBJECT_KEYS:
            raise doc.error(p, f"unknown subject key {key!r}; use one of {', '.join(SUBJECT_KEYS)}")
        if not isinstance(value, str) or not value:
            raise doc.error(f"{p}.{key}", "must be a non-empty string")
        if key == "serviceAccount" and value.count("/") != 1:
            raise doc.error(f"{p}.{key}", "must be NAMESPACE/NAME")
        refs.append(
            SubjectRef(
                group=value if key == "group" else "",
                user=value if key == "user" else "",
                service_account=value if key == "serviceAccount" else "",
            )
        )
    return tuple(refs)


def any_matches(refs: Iterable[SubjectRef], who: Identity) -> bool:
    return any(r.matches(who) for r in refs)
