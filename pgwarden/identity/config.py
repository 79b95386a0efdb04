"""The `identity:` section of a ProxyConfig: which token issuers the proxy trusts, and how.

```yaml
identity:
  oidc:
    - issuer: https://login.example.com/realms/eng
      audience: pgwarden                # or a list; the token's `aud` must name one of them
      discovery: true                   # or jwksUrl: https://... or jwksFile: /etc/pgwarden/jwks.json
      algorithms: [RS256, ES256]        # allowlist; `none` and HMAC (HS*) are refused at load time
      subjectClaim: sub
      groupsClaim: groups               # dotted paths reach nested claims: realm_access.roles
      usernamePrefix: "corp:"           # default: the issuer URL and "#" (https://login…/eng#alice)
      groupsPrefix: "corp:"             # default: the same; "" only for the one issuer you mean unprefixed
      leeway: 30s
    - issuer: https://kubernetes.default.svc.cluster.local
      audience: pgwarden
      kubernetes: true                  # service-account tokens: Identity.service_account, system: groups
      discovery: true
      caFile: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
      tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
  tokenReview: {enabled: true, audiences: [pgwarden]}
  staticUsers: [...]                    # development only; handled by the proxy's SCRAM path
```

Validation happens here, at load time, so a policy author learns of `algorithms: [HS256]` from
the config error rather than from a token that quietly passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pgwarden.resources import Document, ResourceError, get_field, parse_duration

# Asymmetric signature algorithms only: with HMAC the verification key is the signing key, and a
# JWKS is public, so accepting HS* would let anyone who can read the JWKS mint tokens.
ALLOWED_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)
DEFAULT_ALGORITHMS = ("RS256", "ES256")
KUBERNETES_ISSUER_PREFIX = "https://kubernetes.default.svc"


@dataclass(frozen=True)
class OIDCIssuerConfig:
    """One trusted token issuer (an OIDC provider or a cluster's service-account issuer)."""

    issuer: str
    audiences: tuple[str, ...]
    jwks_file: str = ""
    jwks_url: str = ""
    discovery: bool = False
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    subject_claim: str = "sub"
    groups_claim: str = "groups"
    leeway: float = 30.0
    # None: decided from the issuer URL (https://kubernetes.default.svc...)
    kubernetes: bool | None = None
    # for fetching discovery/JWKS from an API server that needs them (in-cluster issuer)
    ca_file: str = ""
    token_file: str = ""
    # how long a fetched key set is trusted before it is fetched again
    jwks_max_age: float = 3600.0
    # at most one refetch per this interval when a token names an unknown `kid`
    refresh_min_interval: float = 30.0
    # None: the default (see user_prefix / group_prefix)
    username_prefix: str | None = None
    groups_prefix: str | None = None

    @property
    def is_kubernetes(self) -> bool:
        if self.kubernetes is not None:
            return self.kubernetes
        return self.issuer.startswith(KUBERNETES_ISSUER_PREFIX)

    @property
    def default_prefix(self) -> str:
        """As Kubernetes does for OIDC usernames: the issuer URL and `#`, so that `sub` and `groups`
        of one issuer never equal another's. A Kubernetes issuer's names (`system:serviceaccount:…`)
        are the cluster's own: no prefix, unless set."""
        return "" if self.is_kubernetes else f"{self.issuer}#"

    @property
    def user_prefix(self) -> str:
        return self.default_prefix if self.username_prefix is None else self.username_prefix

    @property
    def group_prefix(self) -> str:
        return self.default_prefix if self.groups_prefix is None else self.groups_prefix


@dataclass(frozen=True)
class TokenReviewConfig:
    """Ask the Kubernetes API server (authentication.k8s.io/v1 TokenReview) about tokens
    whose issuer is not listed under `oidc` — e.g. when the issuer's JWKS is not reachable."""

    enabled: bool = False
    audiences: tuple[str, ...] = ()
    # empty: in-cluster (KUBERNETES_SERVICE_HOST/PORT, the pod's service-account token and CA)
    api_url: str = ""
    ca_file: str = ""
    token_file: str = ""
    # successful reviews are cached this long (by token hash) so each connection is not a round trip
    cache_ttl: float = 60.0


@dataclass(frozen=True)
class IdentityConfig:
    oidc: tuple[OIDCIssuerConfig, ...] = ()
    token_review: TokenReviewConfig = field(default_factory=TokenReviewConfig)
    # passed through unparsed: the proxy's static SCRAM users (development only) own their format
    static_users: tuple[Mapping[str, Any], ...] = ()

    @property
    def accepts_tokens(self) -> bool:
        return bool(self.oidc) or self.token_review.enabled


def _str_list(doc: Document, raw: Any, path: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise doc.error(path, "must be a string or a list of non-empty strings")
    return tuple(raw)


def _url_ok(url: str) -> bool:
    """https everywhere; plain http only to the local machine (tests, a sidecar IdP)."""
    if url.startswith("https://"):
        return True
    for host in ("http://127.0.0.1", "http://localhost", "http://[::1]"):
        if url.startswith(host) and url[len(host):][:1] in ("", ":", "/"):
            return True
    return False


def parse_issuer(doc: Document, raw: Any, path: str) -> OIDCIssuerConfig:
    if not isinstance(raw, Mapping):
        raise doc.error(path, "must be a mapping with issuer, audience and one of jwksFile, jwksUrl, discovery")
    known = {"issuer", "audience", "audiences", "jwksFile", "jwksUrl", "discovery", "algorithms", "subjectClaim",
             "groupsClaim", "leeway", "kubernetes", "caFile", "tokenFile", "jwksMaxAge", "refreshMinInterval",
             "usernamePrefix", "groupsPrefix"}
    for key in raw:
        if key not in known:
            raise doc.error(f"{path}.{key}", f"unknown field; expected one of {', '.join(sorted(known))}")
    issuer = get_field(doc, raw, "issuer", str, f"{path}.issuer")
    if not _url_ok(issuer):
        raise doc.error(f"{path}.issuer", "must be an https:// URL (http only for localhost)")
    if "#" in issuer:
        # an issuer URL has no fragment (OIDC Discovery 1.0), and `#` ends the default name prefix
        raise doc.error(f"{path}.issuer", "must not contain '#' (issuer URLs have no fragment)")
    prefixes = {}
    for key in ("usernamePrefix", "groupsPrefix"):
        if key in raw:
            value = raw[key]
            if not isinstance(value, str) or not value.isprintable() or len(value) > 256:
                raise doc.error(f"{path}.{key}", "must be a printable string of at most 256 characters ('' for none)")
            prefixes[key] = value
    aud_raw = raw.get("audience", raw.get("audiences"))
    if aud_raw is None:
        raise doc.error(f"{path}.audience", "is required: tokens must be bound to this proxy's audience")
    audiences = _str_list(doc, aud_raw, f"{path}.audience")
    jwks_file = get_field(doc, raw, "jwksFile", str, f"{path}.jwksFile", "")
    jwks_url = get_field(doc, raw, "jwksUrl", str, f"{path}.jwksUrl", "")
    discovery = get_field(doc, raw, "discovery", bool, f"{path}.discovery", False)
    if sum(bool(x) for x in (jwks_file, jwks_url, discovery)) != 1:
        raise doc.error(path, "needs exactly one of jwksFile, jwksUrl, discovery: true")
    if jwks_url and not _url_ok(jwks_url):
        raise doc.error(f"{path}.jwksUrl", "must be an https:// URL (http only for localhost)")
    algorithms = _str_list(doc, raw.get("algorithms", list(DEFAULT_ALGORITHMS)), f"{path}.algorithms")
    for alg in algorithms:
        if alg not in ALLOWED_ALGORITHMS:
            why = ("HMAC would let anyone holding the public JWKS sign tokens" if alg.upper().startswith("HS")
                   else "unsigned tokens are never accepted" if alg.lower() == "none" else "unsupported")
            raise doc.error(f"{path}.algorithms", f"{alg!r} is not allowed ({why}); use any of {', '.join(ALLOWED_ALGORITHMS)}")
    kubernetes = raw.get("kubernetes")
    if kubernetes is not None and not isinstance(kubernetes, bool):
        raise doc.error(f"{path}.kubernetes", "must be true or false")
    return OIDCIssuerConfig(
        issuer=issuer,
        audiences=audiences,
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        discovery=discovery,
        algorithms=algorithms,
        subject_claim=get_field(doc, raw, "subjectClaim", str, f"{path}.subjectClaim", "sub"),
        groups_claim=get_field(doc, raw, "groupsClaim", str, f"{path}.groupsClaim", "groups"),
        leeway=parse_duration(raw.get("leeway", 30), doc, f"{path}.leeway"),
        kubernetes=kubernetes,
        ca_file=get_field(doc, raw, "caFile", str, f"{path}.caFile", ""),
        token_file=get_field(doc, raw, "tokenFile", str, f"{path}.tokenFile", ""),
        jwks_max_age=parse_duration(raw.get("jwksMaxAge", 3600), doc, f"{path}.jwksMaxAge"),
        refresh_min_interval=parse_duration(raw.get("refreshMinInterval", 30), doc, f"{path}.refreshMinInterval"),
        username_prefix=prefixes.get("usernamePrefix"),
        groups_prefix=prefixes.get("groupsPrefix"),
    )


def check_prefixes(doc: Document, issuers: tuple[OIDCIssuerConfig, ...]) -> None:
    """Names of two issuers must never collide. Each issuer's names start with its root: the prefix,
    and for a Kubernetes issuer `system:` after it; other issuers never yield `system:` names (they
    are refused). Two roots collide when one starts the other (`corp:` and `corp:eu:` would let
    `corp:`'s `sub: eu:alice` be `corp:eu:`'s alice)."""
    for attr, key in (("user_prefix", "usernamePrefix"), ("group_prefix", "groupsPrefix")):
        seen: list[tuple[int, str, bool]] = []
        for i, iss in enumerate(issuers):
            root = getattr(iss, attr) + ("system:" if iss.is_kubernetes else "")
            for j, other, other_k8s in seen:
                if _roots_collide(root, iss.is_kubernetes, other, other_k8s):
                    raise doc.error(
                        f"spec.identity.oidc[{i}].{key}",
                        f"{getattr(iss, attr)!r} collides with the names of spec.identity.oidc[{j}]: a name from "
                        f"one issuer could equal a name from the other; give each issuer its own {key} (the "
                        f"default is the issuer URL and '#'; Kubernetes issuers have none by default)")
            seen.append((i, root, iss.is_kubernetes))


def _roots_collide(a: str, a_k8s: bool, b: str, b_k8s: bool) -> bool:
    if not (a.startswith(b) or b.startswith(a)):
        return False
    # an unprefixed non-Kubernetes issuer covers every name except those under system:
    if a == "" and not a_k8s and b.startswith("system:"):
        return False
    if b == "" and not b_k8s and a.startswith("system:"):
        return False
    return True


def parse_token_review(doc: Document, raw: Any, path: str) -> TokenReviewConfig:
    if raw is None:
        return TokenReviewConfig()
    if not isinstance(raw, Mapping):
        raise doc.error(path, "must be a mapping {enabled, audiences}")
    enabled = get_field(doc, raw, "enabled", bool, f"{path}.enabled", True)
    audiences = _str_list(doc, raw["audiences"], f"{path}.audiences") if raw.get("audiences") else ()
    if enabled and not audiences:
        raise doc.error(f"{path}.audiences", "is required: review tokens only for this proxy's audience")
    return TokenReviewConfig(
        enabled=enabled,
        audiences=audiences,
        api_url=get_field(doc, raw, "apiUrl", str, f"{path}.apiUrl", ""),
        ca_file=get_field(doc, raw, "caFile", str, f"{path}.caFile", ""),
        token_file=get_field(doc, raw, "tokenFile", str, f"{path}.tokenFile", ""),
        cache_ttl=parse_duration(raw.get("cacheTTL", 60), doc, f"{path}.cacheTTL"),
    )


def parse_identity_config(spec: Mapping[str, Any], doc: Document | None = None) -> IdentityConfig:
    """Read `spec.identity` of a ProxyConfig document (a missing section means: no tokens)."""
    doc = doc or Document(kind="ProxyConfig", name="inline", namespace="default", spec=spec)
    raw = spec.get("identity")
    if raw is None:
        return IdentityConfig()
    if not isinstance(raw, Mapping):
        raise doc.error("spec.identity", "must be a mapping with oidc, tokenReview, staticUsers")
    oidc_raw = raw.get("oidc") or []
    if not isinstance(oidc_raw, list):
        raise doc.error("spec.identity.oidc", "must be a list of issuers")
    issuers = tuple(parse_issuer(doc, item, f"spec.identity.oidc[{i}]") for i, item in enumerate(oidc_raw))
    seen: set[str] = set()
    for i, iss in enumerate(issuers):
        if iss.issuer in seen:
            raise doc.error(f"spec.identity.oidc[{i}].issuer", f"{iss.issuer!r} is listed twice")
        seen.add(iss.issuer)
    check_prefixes(doc, issuers)
    static = raw.get("staticUsers") or []
    if not isinstance(static, list) or not all(isinstance(u, Mapping) for u in static):
        raise doc.error("spec.identity.staticUsers", "must be a list of mappings")
    return IdentityConfig(
        oidc=issuers,
        token_review=parse_token_review(doc, raw.get("tokenReview"), "spec.identity.tokenReview"),
        static_users=tuple(static),
    )


__all__ = [
    "ALLOWED_ALGORITHMS",
    "IdentityConfig",
    "OIDCIssuerConfig",
    "ResourceError",
    "TokenReviewConfig",
    "parse_identity_config",
]
