"""Kubernetes TokenReview: let the API server say whether a token is valid.

Used for tokens of issuers not listed under `identity.oidc` — typically service-account tokens
in a cluster whose issuer JWKS the proxy cannot reach. The API server checks signature, expiry,
audience and whether the bound pod or secret still exists (which a JWKS check cannot).
`TokenReviewer` is the seam: the default talks HTTP to the API server with the shared client
(`pgwarden.k8s.client`), tests point it at kmock's Kubernetes emulator.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import aiohttp

from pgwarden.cache import BoundedCache
from pgwarden.identity.config import TokenReviewConfig
from pgwarden.identity.tokens import TokenRejected
from pgwarden.k8s.client import IN_CLUSTER_DIR, ApiConfig, Kube, TokenUnreadable, in_cluster_server
from pgwarden.subjects import Identity

REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


class TokenReviewUnavailable(Exception):
    """The API server could not be asked; the token is neither accepted nor known bad."""


class TokenReviewer(Protocol):
    async def review(self, token: str, audiences: tuple[str, ...]) -> Mapping[str, Any]:
        """POST a TokenReview and return its `status`."""
        ...

    async def close(self) -> None: ...


def identity_from_review(status: Mapping[str, Any], audiences: tuple[str, ...]) -> Identity:
    """TokenReview status -> Identity (pure)."""
    if not status.get("authenticated"):
        why = status.get("error") or "the API server did not authenticate it"
        raise TokenRejected(f"the Kubernetes API server rejected the token: {why}")
    granted = status.get("audiences")
    if audiences and not isinstance(granted, list):
        # an answer without status.audiences does not say the token is for this proxy: an
        # authenticator that ignores audiences (a token meant for another service) answers so
        raise TokenRejected(f"the Kubernetes API server did not confirm the token's audience (no "
                            f"status.audiences in its TokenReview answer); this proxy needs a token for "
                            f"{', '.join(audiences)}")
    if audiences and not {g for g in granted or () if isinstance(g, str)} & set(audiences):
        raise TokenRejected(f"the token is not meant for this proxy: its audience must include one of "
                            f"{', '.join(audiences)}")
    user = status.get("user") or {}
    username = user.get("username")
    if not isinstance(username, str) or not username:
        raise TokenRejected("the API server authenticated the token but named no user")
    groups = tuple(g for g in user.get("groups") or () if isinstance(g, str))
    service_account = ""
    parts = username.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        service_account = f"{parts[2]}/{parts[3]}"
    return Identity(subject=username, groups=groups, issuer="kubernetes-tokenreview",
                    service_account=service_account, method="tokenreview",
                    claims={"tokenreview": {"user": dict(user)}})


class KubernetesTokenReviewer:
    """POST authentication.k8s.io/v1 TokenReview to the API server (in-cluster by default)."""

    def __init__(self, config: TokenReviewConfig, *,
                 session_factory: Callable[[], aiohttp.ClientSession] | None = None) -> None:
        self.config = config
        self._session_factory = session_factory
        self._kube: Kube | None = None

    def _api_url(self) -> str:
        if self.config.api_url:
            return self.config.api_url.rstrip("/")
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise TokenReviewUnavailable("tokenReview.apiUrl is not set and this is not a pod "
                                         "(KUBERNETES_SERVICE_HOST is unset)")
        return in_cluster_server(host, port)

    def _client(self) -> Kube:
        """The API client, made on first use: outside a pod without apiUrl, only a review fails."""
        if self._kube is None:
            in_cluster = not self.config.api_url
            api = ApiConfig(
                server=self._api_url(),
                token_file=self.config.token_file or (str(IN_CLUSTER_DIR / "token") if in_cluster else None),
                ca_file=self.config.ca_file or (str(IN_CLUSTER_DIR / "ca.crt") if in_cluster else None),
            )
            self._kube = Kube(api, timeout=None if self._session_factory else 10,
                              session_factory=self._session_factory)
        return self._kube

    async def review(self, token: str, audiences: tuple[str, ...]) -> Mapping[str, Any]:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": list(audiences)}}
        try:
            answer = await self._client().send("POST", REVIEW_PATH, body)
        except TokenUnreadable as e:
            raise TokenReviewUnavailable(f"cannot read the proxy's own token {e.path}: {e.strerror}") from e
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise TokenReviewUnavailable(f"TokenReview request failed: {e or type(e).__name__}") from e
        if answer.status not in (200, 201):
            raise TokenReviewUnavailable(f"TokenReview answered HTTP {answer.status}; the proxy's service "
                                         f"account needs 'create' on tokenreviews.authentication.k8s.io")
        if not isinstance(answer.data, dict):
            raise TokenReviewUnavailable("TokenReview answer is not JSON")
        return answer.data.get("status") or {}

    async def close(self) -> None:
        if self._kube is not None:
            await self._kube.close()


class ReviewCache:
    """Recent positive reviews by token hash: one API round trip per token per TTL, not per login."""

    def __init__(self, ttl: float, size: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.size = size
        self._clock = clock
        self._entries: BoundedCache[str, tuple[float, Identity]] = BoundedCache(size)

    @staticmethod
    def key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def get(self, token: str) -> Identity | None:
        k = self.key(token)
        hit = self._entries.get(k)
        if hit is None:
            return None
        if self._clock() - hit[0] > self.ttl:
            self._entries.pop(k)
            return None
        return hit[1]

    def put(self, token: str, identity: Identity) -> None:
        self._entries.put(self.key(token), (self._clock(), identity))
