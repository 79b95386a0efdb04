"""Verified claims -> Identity. Pure functions: no keys, no I/O.

Kubernetes service-account tokens carry `kubernetes.io: {namespace, serviceaccount: {name}, pod}`;
they become the same identity the API server would give them (`system:serviceaccount:NS:NAME`,
groups `system:serviceaccounts` and `system:serviceaccounts:NS`), so policies can name them
either by `{serviceAccount: NS/NAME}` or by those groups.

Names are namespaced by issuer (`OIDCIssuerConfig.user_prefix` / `group_prefix`), as Kubernetes
does for OIDC: by default `https://login.example.com/realms/eng#alice` and
`https://login.example.com/realms/eng#dba`, so a token of one issuer whose `sub` equals a
service account's subject, or whose `groups` say `dba`, is neither that account nor in the dba
group that policies mean. Names under `system:` belong to Kubernetes: another issuer that
ends up with one (an empty prefix) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pgwarden.identity.config import OIDCIssuerConfig
from pgwarden.subjects import Identity

SYSTEM = "system:"


class ClaimsError(ValueError):
    """The token verified but does not say who the caller is in a way we can use."""


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """`groups` or a dotted path into nested claims (`realm_access.roles`).

    A claim whose own name contains dots (`https://example.com/groups`) is found first as-is."""
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def groups_from(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        # some IdPs send a single group as a string, a few as "a,b" or "a b"
        return tuple(g for g in value.replace(",", " ").split() if g)
    if isinstance(value, list):
        return tuple(str(g) for g in value if isinstance(g, str | int) and str(g))
    raise ClaimsError("the groups claim is neither a string nor a list")


def kubernetes_identity(claims: Mapping[str, Any], issuer: str, method: str, *, user_prefix: str = "",
                        group_prefix: str = "") -> Identity:
    k8s = claims.get("kubernetes.io")
    if not isinstance(k8s, Mapping):
        raise ClaimsError("a service-account token must carry the 'kubernetes.io' claim")
    ns = k8s.get("namespace")
    sa = k8s.get("serviceaccount")
    name = sa.get("name") if isinstance(sa, Mapping) else None
    if not isinstance(ns, str) or not ns or not isinstance(name, str) or not name:
        raise ClaimsError("the 'kubernetes.io' claim lacks namespace or serviceaccount.name")
    groups = ("system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated")
    return Identity(
        subject=f"{user_prefix}system:serviceaccount:{ns}:{name}",
        groups=tuple(group_prefix + g for g in groups),
        issuer=issuer,
        # `{serviceAccount: NS/NAME}` names the cluster's own accounts: those of a prefixed (other)
        # cluster are named by their prefixed user instead
        service_account="" if user_prefix else f"{ns}/{name}",
        method=method,
        claims=dict(claims),
    )


def identity_from_claims(claims: Mapping[str, Any], config: OIDCIssuerConfig) -> Identity:
    if config.is_kubernetes:
        return kubernetes_identity(claims, config.issuer, "jwt", user_prefix=config.user_prefix,
                                   group_prefix=config.group_prefix)
    subject = claim_at(claims, config.subject_claim)
    if not isinstance(subject, str | int) or not str(subject):
        raise ClaimsError(f"the token has no {config.subject_claim!r} claim to name the caller")
    return namespaced(str(subject), groups_from(claim_at(claims, config.groups_claim)), config, dict(claims))


def namespaced(subject: str, groups: tuple[str, ...], config: OIDCIssuerConfig, claims: dict[str, Any]) -> Identity:
    """An OIDC caller with the issuer's prefixes applied (pure)."""
    user = config.user_prefix + subject
    prefixed = tuple(config.group_prefix + g for g in groups)
    if user.startswith(SYSTEM):
        raise ClaimsError(f"the token names the caller {user!r}: names under 'system:' belong to Kubernetes; "
                          f"give the issuer {config.issuer} a usernamePrefix")
    reserved = [g for g in prefixed if g.startswith(SYSTEM)]
    if reserved:
        raise ClaimsError(f"the token claims the group {reserved[0]!r}: groups under 'system:' belong to "
                          f"Kubernetes; give the issuer {config.issuer} a groupsPrefix")
    return Identity(subject=user, groups=prefixed, issuer=config.issuer, method="jwt", claims=claims)


def pod_of(identity: Identity) -> str:
    """`namespace/pod` of the pod a bound service-account token was issued for, if any."""
    k8s = identity.claims.get("kubernetes.io") if identity.claims else None
    if isinstance(k8s, Mapping) and isinstance(k8s.get("pod"), Mapping):
        name = k8s["pod"].get("name")
        if isinstance(name, str) and name:
            return f"{k8s.get('namespace', '')}/{name}"
    return ""
