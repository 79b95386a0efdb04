"""TokenAuthenticator: a JWT sent as the PostgreSQL password -> Identity, or AuthenticationFailed.

Routing uses the token's unverified `iss` only to pick which issuer's keys to verify with; the
signature, `iss`, `aud`, `exp` and `nbf` are then checked against that issuer's configuration.
Tokens of unlisted issuers go to TokenReview when it is enabled, else they are refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import aiohttp
import jwt

from pgwarden.errors import AuthenticationFailed
from pgwarden.identity.claims import ClaimsError, identity_from_claims
from pgwarden.identity.config import IdentityConfig, OIDCIssuerConfig
from pgwarden.identity.jwks import JWKSCache, KeySetUnavailable
from pgwarden.identity.tokenreview import (
    KubernetesTokenReviewer,
    ReviewCache,
    TokenReviewer,
    TokenReviewUnavailable,
    identity_from_review,
)
from pgwarden.identity.tokens import TokenRejected, peek, verify
from pgwarden.subjects import Identity

log = logging.getLogger(__name__)

HINT = "Send a current token from a trusted issuer as the password (PGPASSWORD)."


def _failed(reason: str) -> AuthenticationFailed:
    return AuthenticationFailed(f"token authentication failed: {reason}", hint=HINT)


class TokenAuthenticator:
    """One per proxy process; share it across connections (it owns key caches and HTTP sessions)."""

    def __init__(
        self,
        config: IdentityConfig,
        *,
        reviewer: TokenReviewer | None = None,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._issuers: dict[str, OIDCIssuerConfig] = {i.issuer: i for i in config.oidc}
        self._keys: dict[str, JWKSCache] = {
            i.issuer: JWKSCache(i, session_factory=session_factory, clock=clock) for i in config.oidc
        }
        review = config.token_review
        self._reviewer: TokenReviewer | None = None
        if review.enabled:
            self._reviewer = reviewer or KubernetesTokenReviewer(review, session_factory=session_factory)
        self._review_cache = ReviewCache(review.cache_ttl, clock=clock)

    async def close(self) -> None:
        for cache in self._keys.values():
            await cache.close()
        if self._reviewer is not None:
            await self._reviewer.close()

    async def authenticate(self, token: str) -> Identity:
        """Verify `token`; raises AuthenticationFailed (28P01) saying why, never how keys look."""
        token = token.strip()
        try:
            head = peek(token)
        except TokenRejected as e:
            raise _failed(str(e)) from None
        issuer = self._issuers.get(head.issuer)
        if issuer is None:
            if self._reviewer is not None:
                return await self._review(token)
            known = ", ".join(self._issuers) or "none configured"
            raise _failed(f"issuer {head.issuer!r} is not trusted (trusted: {known})")
        try:
            keys = await self._keys[issuer.issuer].candidates(head.kid, head.alg)
        except KeySetUnavailable as e:
            log.error("cannot load keys of %s: %s", issuer.issuer, e)
            raise _failed(f"the signing keys of {issuer.issuer} cannot be loaded right now; try again "
                          f"later or ask the operator to check the proxy's log") from None
        try:
            claims = verify(token, head, keys, issuer)
            return identity_from_claims(claims, issuer)
        except (TokenRejected, ClaimsError) as e:
            raise _failed(str(e)) from None

    async def _review(self, token: str) -> Identity:
        assert self._reviewer is not None
        cached = self._review_cache.get(token)
        if cached is not None and not _expired_unverified(token):
            return cached
        audiences = self.config.token_review.audiences
        try:
            status = await self._reviewer.review(token, audiences)
            identity = identity_from_review(status, audiences)
        except TokenReviewUnavailable as e:
            log.error("TokenReview: %s", e)
            raise _failed("the Kubernetes API server could not review the token right now; try again later") from None
        except TokenRejected as e:
            raise _failed(str(e)) from None
        self._review_cache.put(token, identity)
        return identity


def _expired_unverified(token: str) -> bool:
    """Cache hits must not outlive the token itself (the review said yes at an earlier time)."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return False
    return isinstance(exp, int | float) and exp < time.time()
