"""Who is calling: JWT / Kubernetes service-account tokens sent as the password, TokenReview,
and a per-source back-off against guessing. The proxy calls `TokenAuthenticator.authenticate`.
"""

from pgwarden.identity.authenticator import TokenAuthenticator
from pgwarden.identity.backoff import FailureBackoff
from pgwarden.identity.claims import pod_of
from pgwarden.identity.config import (
    IdentityConfig,
    OIDCIssuerConfig,
    TokenReviewConfig,
    parse_identity_config,
)
from pgwarden.identity.tokens import looks_like_jwt
from pgwarden.identity.workload import workload_from_env

__all__ = [
    "FailureBackoff",
    "IdentityConfig",
    "OIDCIssuerConfig",
    "TokenAuthenticator",
    "TokenReviewConfig",
    "looks_like_jwt",
    "parse_identity_config",
    "pod_of",
    "workload_from_env",
]
