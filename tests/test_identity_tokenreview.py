"""TokenReview: tokens of issuers not configured for JWKS are reviewed by the API server.

The API server is kmock's Kubernetes scaffold (stateless: TokenReviews are never stored, as on a
real API server); its TokenReview reaction plays the API server's part (it knows which tokens it
issued), so the proxy's request, headers and mapping are real.
"""

from __future__ import annotations

import functools
from typing import Any

import jwt
import kmock
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from pgwarden.errors import AuthenticationFailed
from pgwarden.identity import TokenAuthenticator, parse_identity_config
from pgwarden.identity.tokenreview import REVIEW_PATH

ISSUED = {
    # what the cluster issued: token -> (username, groups, audiences)
    "sa-token": ("system:serviceaccount:agents:cursor-agent",
                 ["system:serviceaccounts", "system:serviceaccounts:agents", "system:authenticated"], ["pgwarden"]),
    "other-aud": ("system:serviceaccount:agents:ci", ["system:serviceaccounts"], ["vault"]),
}


CLUSTER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def as_jwt(name: str) -> str:
    # the cluster's key is unknown to the proxy (issuer not under identity.oidc): only the API server can tell
    return jwt.encode({"iss": "https://oidc.eks.example.com/id/ABC", "name": name}, CLUSTER_KEY, algorithm="RS256")


def review(request: Any) -> dict[str, Any]:
    spec = request.data["spec"]
    names = {as_jwt(k): k for k in ISSUED}
    name = names.get(spec["token"])
    status: dict[str, Any] = {"authenticated": False, "error": "invalid bearer token"}
    if name:
        user, groups, auds = ISSUED[name]
        ok = set(auds) & set(spec.get("audiences") or [])
        status = ({"authenticated": True, "user": {"username": user, "groups": groups}, "audiences": sorted(ok)}
                  if ok else {"authenticated": False, "error": "token audiences is invalid for the target audiences"})
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}


pytestmark = pytest.mark.kmock(cls=kmock.KubernetesScaffold)


@pytest.fixture
def reviewed(kmock: Any) -> Any:
    kmock["post", REVIEW_PATH] << review
    return kmock


async def test_tokenreview_maps_service_account(reviewed: Any, tmp_path: Any) -> None:
    bearer = tmp_path / "token"
    bearer.write_text("proxy-own-token\n")
    cfg = parse_identity_config({"identity": {"tokenReview": {"enabled": True, "audiences": ["pgwarden"],
                                                               "apiUrl": str(reviewed.url), "tokenFile": str(bearer)}}})
    a = TokenAuthenticator(cfg)
    try:
        who = await a.authenticate(as_jwt("sa-token"))
        assert who.service_account == "agents/cursor-agent"
        assert who.method == "tokenreview"
        assert "system:serviceaccounts:agents" in who.groups
        # cached: one review per token per TTL
        await a.authenticate(as_jwt("sa-token"))
        posts = [r for r in reviewed if r.method == "POST"]
        assert len(posts) == 1
        assert posts[0].headers["Authorization"] == "Bearer proxy-own-token"
        assert posts[0].data["spec"]["audiences"] == ["pgwarden"]

        with pytest.raises(AuthenticationFailed, match="audiences is invalid"):
            await a.authenticate(as_jwt("other-aud"))
        with pytest.raises(AuthenticationFailed, match="rejected the token"):
            await a.authenticate(as_jwt("never-issued"))
    finally:
        await a.close()


async def test_tokenreview_unreachable_api_server() -> None:
    cfg = parse_identity_config({"identity": {"tokenReview": {"enabled": True, "audiences": ["pgwarden"],
                                                               "apiUrl": "http://127.0.0.1:9"}}})
    a = TokenAuthenticator(cfg)
    try:
        with pytest.raises(AuthenticationFailed, match="could not review"):
            await a.authenticate(as_jwt("sa-token"))
    finally:
        await a.close()


async def test_an_answer_without_audiences_is_refused_when_audiences_were_asked(kmock: Any) -> None:
    """An authenticator that ignores audiences says `authenticated: true` for a token meant for another
    service, and no `status.audiences`: that does not make the token this proxy's."""
    kmock["post", REVIEW_PATH] << (lambda request: {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                                   "status": {"authenticated": True, "user": {
                                                       "username": "system:serviceaccount:agents:ci"}}})
    cfg = parse_identity_config({"identity": {"tokenReview": {"enabled": True, "audiences": ["pgwarden"],
                                                               "apiUrl": str(kmock.url)}}})
    a = TokenAuthenticator(cfg)
    try:
        with pytest.raises(AuthenticationFailed, match="did not confirm the token's audience"):
            await a.authenticate(as_jwt("other-aud"))
    finally:
        await a.close()
