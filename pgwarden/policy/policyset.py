"""All AccessPolicies of a configuration, and the selection that applies to one caller."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pgwarden.cache import BoundedCache
from pgwarden.policy.engine import SubjectPolicy
from pgwarden.policy.model import AccessPolicy, parse_access_policy
from pgwarden.resources import Document, of_kind
from pgwarden.subjects import Identity, any_matches


@dataclass(frozen=True)
class PolicySet:
    """Every AccessPolicy loaded from a configuration, sorted by namespace/name for stable output."""

    policies: tuple[AccessPolicy, ...] = ()
    # One SubjectPolicy per (identity, connection), so all sessions of a caller share its decision cache.
    _subjects: BoundedCache[tuple[Identity, str], SubjectPolicy] = field(
        default_factory=lambda: BoundedCache(256), compare=False, repr=False)

    def for_identity(self, identity: Identity, connection: str) -> SubjectPolicy:
        """The policies for `connection` whose subjects name the caller, combined.

        Several policies combine per access: explicit rules first (deny wins over review wins
        over allow), then system-catalog reads, then the strictest defaultAction. When none
        applies, the SubjectPolicy denies everything and its messages say which subjects and
        connection were tried, so the person can ask for the right subject to be added.
        """
        key = (identity, connection)
        cached = self._subjects.get(key)
        if cached is not None:
            return cached
        subject = self._select(identity, connection)
        self._subjects.put(key, subject)
        return subject

    def _select(self, identity: Identity, connection: str) -> SubjectPolicy:
        on_conn = [p for p in self.policies if p.connection == connection]
        chosen = [p for p in on_conn if any_matches(p.subjects, identity)]
        tried = ""
        if not chosen:
            who = [f"user:{identity.subject}", *(f"group:{g}" for g in identity.groups)]
            if identity.service_account:
                who.append(f"serviceAccount:{identity.service_account}")
            if on_conn:
                names = ", ".join(p.id for p in on_conn)
                tried = (f"no AccessPolicy for connection {connection!r} names {', '.join(who)} "
                         f"(policies for it: {names})")
            else:
                tried = f"no AccessPolicy refers to connection {connection!r} (tried as {', '.join(who)})"
        return SubjectPolicy(identity, connection, chosen, tried=tried)

    @property
    def connections(self) -> tuple[str, ...]:
        return tuple(sorted({p.connection for p in self.policies}))


def load_policies(docs: Iterable[Document]) -> PolicySet:
    """Parse every AccessPolicy document; any error raises ResourceError naming document and field.

    Two documents with the same namespace/name are an error too: silently keeping one of them
    would make the effective policy depend on file order.
    """
    seen: dict[str, Document] = {}
    policies = []
    for doc in of_kind(docs, "AccessPolicy"):
        key = f"{doc.namespace}/{doc.name}"
        if key in seen:
            raise doc.error("metadata.name", f"AccessPolicy {key} is also defined in {seen[key].where}")
        seen[key] = doc
        policies.append(parse_access_policy(doc))
    policies.sort(key=lambda p: (p.namespace, p.name))
    return PolicySet(tuple(policies))
