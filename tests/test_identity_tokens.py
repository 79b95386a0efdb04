"""JWTs sent as the password: valid tokens become identities, every classic attack is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from pgwarden.errors import AuthenticationFailed
from pgwarden.identity import TokenAuthenticator, parse_identity_config
from pgwarden.identity.config import OIDCIssuerConfig

ISSUER = "https://idp.example.com/realms/eng"
AUD = "pgwarden"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwk_of(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algo = RSAAlgorithm if alg.startswith(("RS", "PS")) else ECAlgorithm
    d = algo.to_jwk(key.public_key(), as_dict=True)
    d.update(kid=kid, alg=alg, use="sig")
    return d


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c = {"iss": ISSUER, "aud": AUD, "sub": "u-123", "email": "alice@example.com", "iat": now,
         "exp": now + 300, "groups": ["ai-agents", "eng"]}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def sign(key: Any, kid: str, alg: str = "RS256", **over: Any) -> str:
    return jwt.encode(claims(**over), key, algorithm=alg, headers={"kid": kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def config(tmp_path: Path, keys: list[dict[str, Any]], **issuer: Any) -> Any:
    f = tmp_path / "jwks.json"
    f.write_text(json.dumps({"keys": keys}))
    spec = {"identity": {"oidc": [{"issuer": ISSUER, "audience": AUD, "jwksFile": str(f),
                                   "algorithms": ["RS256", "ES256"], **issuer}]}}
    return parse_identity_config(spec)


@pytest.fixture
def auth(tmp_path: Path, rsa_key: Any, ec_key: Any) -> TokenAuthenticator:
    return TokenAuthenticator(config(tmp_path, [jwk_of(rsa_key, "r1", "RS256"), jwk_of(ec_key, "e1", "ES256")]))


async def rejected(auth: TokenAuthenticator, token: str) -> str:
    with pytest.raises(AuthenticationFailed) as e:
        await auth.authenticate(token)
    assert e.value.sqlstate == "28P01"
    return e.value.message


# --- accepted ----------------------------------------------------------------------------------

async def test_valid_rs256_and_es256(auth: TokenAuthenticator, rsa_key: Any, ec_key: Any) -> None:
    who = await auth.authenticate(sign(rsa_key, "r1"))
    # namespaced by issuer (the default prefix: the issuer URL and "#")
    assert (who.subject, who.groups, who.issuer, who.method) == (
        f"{ISSUER}#u-123", (f"{ISSUER}#ai-agents", f"{ISSUER}#eng"), ISSUER, "jwt")
    who = await auth.authenticate(sign(ec_key, "e1", "ES256"))
    assert who.subject == f"{ISSUER}#u-123"


async def test_subject_and_groups_from_configured_claims(tmp_path: Path, rsa_key: Any) -> None:
    a = TokenAuthenticator(config(tmp_path, [jwk_of(rsa_key, "r1", "RS256")], subjectClaim="email",
                                  groupsClaim="realm_access.roles", usernamePrefix="", groupsPrefix="eng:"))
    who = await a.authenticate(sign(rsa_key, "r1", realm_access={"roles": ["dba", "privacy-officers"]}))
    assert who.subject == "alice@example.com"
    assert who.groups == ("eng:dba", "eng:privacy-officers")


async def test_audience_list_claim_and_leeway(auth: TokenAuthenticator, rsa_key: Any) -> None:
    now = int(time.time())
    who = await auth.authenticate(sign(rsa_key, "r1", aud=["other", AUD], exp=now - 5))  # within 30s leeway
    assert who.subject == f"{ISSUER}#u-123"


async def test_token_without_kid_uses_matching_key(auth: TokenAuthenticator, rsa_key: Any) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert (await auth.authenticate(token)).subject == f"{ISSUER}#u-123"


async def test_kubernetes_service_account_token(tmp_path: Path, rsa_key: Any) -> None:
    k8s_iss = "https://kubernetes.default.svc.cluster.local"
    f = tmp_path / "k8s.json"
    f.write_text(json.dumps({"keys": [jwk_of(rsa_key, "k1", "RS256")]}))
    cfg = parse_identity_config({"identity": {"oidc": [{"issuer": k8s_iss, "audience": AUD, "jwksFile": str(f)}]}})
    assert cfg.oidc[0].is_kubernetes
    a = TokenAuthenticator(cfg)
    token = sign(rsa_key, "k1", iss=k8s_iss, sub="system:serviceaccount:agents:cursor-agent", groups=None,
                 email=None, **{"kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "cursor-agent",
                                                  "uid": "u"}, "pod": {"name": "cursor-agent-7d9f", "uid": "p"}}})
    who = await a.authenticate(token)
    assert who.service_account == "agents/cursor-agent"
    assert who.subject == "system:serviceaccount:agents:cursor-agent"
    assert {"system:serviceaccounts", "system:serviceaccounts:agents"} <= set(who.groups)
    from pgwarden.identity import pod_of
    assert pod_of(who) == "agents/cursor-agent-7d9f"
    # an SA token lacking the kubernetes.io claim is refused, not mapped to a bare subject
    assert "kubernetes.io" in await rejected(a, sign(rsa_key, "k1", iss=k8s_iss))


# --- attacks -----------------------------------------------------------------------------------

async def test_another_issuer_cannot_be_a_service_account_or_in_its_groups(tmp_path: Path, rsa_key: Any,
                                                                         other_rsa_key: Any) -> None:
    """Two trusted issuers: the cluster's and an IdP. The IdP's token names the cluster's service
    account as `sub` and claims `groups: [dba, system:masters]`: it becomes neither."""
    from pgwarden.subjects import SubjectRef

    k8s_iss = "https://kubernetes.default.svc.cluster.local"
    (tmp_path / "k8s.json").write_text(json.dumps({"keys": [jwk_of(rsa_key, "k1", "RS256")]}))
    (tmp_path / "idp.json").write_text(json.dumps({"keys": [jwk_of(other_rsa_key, "i1", "RS256")]}))
    a = TokenAuthenticator(parse_identity_config({"identity": {"oidc": [
        {"issuer": k8s_iss, "audience": AUD, "jwksFile": str(tmp_path / "k8s.json")},
        {"issuer": ISSUER, "audience": AUD, "jwksFile": str(tmp_path / "idp.json")},
    ]}}))
    sa_sub = "system:serviceaccount:agents:cursor-agent"
    real = await a.authenticate(sign(rsa_key, "k1", iss=k8s_iss, sub=sa_sub, groups=None, email=None, **{
        "kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "cursor-agent"}}}))
    fake = await a.authenticate(sign(other_rsa_key, "i1", sub=sa_sub, groups=["dba"]))
    assert real.subject == sa_sub and real.service_account == "agents/cursor-agent"
    assert fake.subject == f"{ISSUER}#{sa_sub}" and fake.service_account == ""
    assert fake.groups == (f"{ISSUER}#dba",)
    assert not SubjectRef(service_account="agents/cursor-agent").matches(fake)
    assert not SubjectRef(user=sa_sub).matches(fake)
    assert not SubjectRef(group="dba").matches(fake)
    assert SubjectRef(group=f"{ISSUER}#dba").matches(fake)  # how a policy names that IdP's group
    # the approval bound to the account is not the other issuer's to consume
    from pgwarden.approvals import statement_hash
    assert statement_hash("DELETE FROM t", (), real.subject, "c", real.issuer) != \
        statement_hash("DELETE FROM t", (), sa_sub, "c", fake.issuer)


async def test_an_unprefixed_issuer_cannot_claim_system_names(tmp_path: Path, rsa_key: Any) -> None:
    a = TokenAuthenticator(config(tmp_path, [jwk_of(rsa_key, "r1", "RS256")], usernamePrefix="", groupsPrefix=""))
    assert "names under 'system:' belong to Kubernetes" in await rejected(
        a, sign(rsa_key, "r1", sub="system:serviceaccount:agents:cursor-agent"))
    assert "groups under 'system:' belong to Kubernetes" in await rejected(
        a, sign(rsa_key, "r1", groups=["system:masters"]))
    assert (await a.authenticate(sign(rsa_key, "r1"))).groups == ("ai-agents", "eng")



async def test_alg_none(auth: TokenAuthenticator) -> None:
    token = f"{b64(json.dumps({'alg': 'none', 'kid': 'r1'}).encode())}.{b64(json.dumps(claims()).encode())}."
    assert "alg none" in await rejected(auth, token)
    token = f"{b64(json.dumps({'alg': 'NONE'}).encode())}.{b64(json.dumps(claims()).encode())}."
    assert "never accepted" in await rejected(auth, token)


async def test_hs256_signed_with_the_public_key(auth: TokenAuthenticator, rsa_key: Any) -> None:
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for secret in (pem, json.dumps(jwk_of(rsa_key, "r1", "RS256")).encode()):
        signing_input = f"{b64(json.dumps({'alg': 'HS256', 'kid': 'r1'}).encode())}.{b64(json.dumps(claims()).encode())}"
        sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        msg = await rejected(auth, f"{signing_input}.{b64(sig)}")
        assert "HS256" in msg and "asymmetric" in msg


async def test_wrong_key(auth: TokenAuthenticator, other_rsa_key: Any, rsa_key: Any) -> None:
    msg = await rejected(auth, sign(other_rsa_key, "r1"))
    assert "signature does not verify" in msg
    n = jwk_of(rsa_key, "r1", "RS256")["n"]
    assert n[:20] not in msg and "BEGIN" not in msg


async def test_tampered_payload(auth: TokenAuthenticator, rsa_key: Any) -> None:
    h, _, s = sign(rsa_key, "r1").split(".")
    forged = b64(json.dumps(claims(groups=["dba"])).encode())
    assert "signature" in await rejected(auth, f"{h}.{forged}.{s}")


async def test_expired(auth: TokenAuthenticator, rsa_key: Any) -> None:
    now = int(time.time())
    msg = await rejected(auth, sign(rsa_key, "r1", exp=now - 120))
    assert "expired at" in msg and "fresh token" in msg


async def test_missing_exp(auth: TokenAuthenticator, rsa_key: Any) -> None:
    token = jwt.encode({k: v for k, v in claims().items() if k != "exp"}, rsa_key, algorithm="RS256",
                       headers={"kid": "r1"})
    assert "'exp'" in await rejected(auth, token)


async def test_not_yet_valid(auth: TokenAuthenticator, rsa_key: Any) -> None:
    assert "not valid before" in await rejected(auth, sign(rsa_key, "r1", nbf=int(time.time()) + 600))


async def test_wrong_audience(auth: TokenAuthenticator, rsa_key: Any) -> None:
    msg = await rejected(auth, sign(rsa_key, "r1", aud="some-other-service"))
    assert "audience" in msg and AUD in msg


async def test_wrong_issuer(auth: TokenAuthenticator, rsa_key: Any) -> None:
    assert "not trusted" in await rejected(auth, sign(rsa_key, "r1", iss="https://evil.example.com"))


async def test_algorithm_outside_issuer_allowlist(tmp_path: Path, ec_key: Any) -> None:
    a = TokenAuthenticator(config(tmp_path, [jwk_of(ec_key, "e1", "ES256")], algorithms=["RS256"]))
    assert "configured for RS256" in await rejected(a, sign(ec_key, "e1", "ES256"))


async def test_key_type_confusion(auth: TokenAuthenticator, ec_key: Any) -> None:
    # an ES256 token naming the RSA key's kid must not be verified with any key
    assert "no signing key" in await rejected(auth, sign(ec_key, "r1", "ES256"))


async def test_not_a_jwt(auth: TokenAuthenticator) -> None:
    assert "not a JWT" in await rejected(auth, "hunter2")


# --- JWKS over HTTP: discovery, refresh on unknown kid, rate limit ----------------------------

class IdP:
    """A local HTTP server publishing test keys (test data over real HTTP)."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.hits: list[str] = []
        self.issuer = ""
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/jwks", self.jwks)
        self.server = TestServer(app, host="127.0.0.1")

    async def discovery(self, request: web.Request) -> web.Response:
        self.hits.append("discovery")
        return web.json_response({"issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwks"})

    async def jwks(self, request: web.Request) -> web.Response:
        self.hits.append("jwks")
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def idp(rsa_key: Any) -> Any:
    server = IdP([jwk_of(rsa_key, "r1", "RS256")])
    await server.server.start_server()
    server.issuer = str(server.server.make_url("")).rstrip("/")
    yield server
    await server.server.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_discovery_and_refresh_on_unknown_kid(idp: IdP, rsa_key: Any, other_rsa_key: Any) -> None:
    clock = Clock()
    cfg = parse_identity_config({"identity": {"oidc": [{"issuer": idp.issuer, "audience": AUD, "discovery": True,
                                                          "refreshMinInterval": "30s"}]}})
    a = TokenAuthenticator(cfg, clock=clock)
    try:
        assert (await a.authenticate(sign(rsa_key, "r1", iss=idp.issuer))).issuer == idp.issuer
        assert idp.hits == ["discovery", "jwks"]
        # cached: no further fetch
        await a.authenticate(sign(rsa_key, "r1", iss=idp.issuer))
        assert len(idp.hits) == 2
        # an unknown kid triggers one refresh, which does not find it either
        clock.now += 31
        msg = await rejected(a, sign(other_rsa_key, "r9", iss=idp.issuer))
        assert "no signing key" in msg and "'r9'" in msg
        assert len(idp.hits) == 4
        # a burst of random kids right after does not hammer the IdP
        for i in range(5):
            await rejected(a, sign(other_rsa_key, f"x{i}", iss=idp.issuer))
        assert len(idp.hits) == 4
        # key rotation: the IdP publishes r2; after the interval the new kid is found
        idp.keys.append(jwk_of(other_rsa_key, "r2", "RS256"))
        clock.now += 31
        assert (await a.authenticate(sign(other_rsa_key, "r2", iss=idp.issuer))).subject == f"{idp.issuer}#u-123"
        assert len(idp.hits) == 6
    finally:
        await a.close()


async def test_jwks_url_and_outage_keeps_cached_keys(idp: IdP, rsa_key: Any) -> None:
    clock = Clock()
    cfg = parse_identity_config({"identity": {"oidc": [{"issuer": idp.issuer, "audience": AUD,
                                                          "jwksUrl": f"{idp.issuer}/jwks", "jwksMaxAge": "60s"}]}})
    a = TokenAuthenticator(cfg, clock=clock)
    try:
        await a.authenticate(sign(rsa_key, "r1", iss=idp.issuer))
        await idp.server.close()
        clock.now += 120  # stale, and the IdP is down: cached keys still verify
        assert (await a.authenticate(sign(rsa_key, "r1", iss=idp.issuer))).subject == f"{idp.issuer}#u-123"
    finally:
        await a.close()


async def test_unreachable_jwks_fails_with_reason(rsa_key: Any) -> None:
    iss = "http://127.0.0.1:9"
    cfg = parse_identity_config({"identity": {"oidc": [{"issuer": iss, "audience": AUD, "jwksUrl": f"{iss}/jwks"}]}})
    a = TokenAuthenticator(cfg)
    try:
        assert "cannot be loaded" in await rejected(a, sign(rsa_key, "r1", iss=iss))
    finally:
        await a.close()


async def test_discovery_issuer_mismatch_is_refused(idp: IdP, rsa_key: Any) -> None:
    real = idp.issuer
    idp.issuer = "https://impostor.example.com"  # the discovery document names someone else
    cfg = parse_identity_config({"identity": {"oidc": [{"issuer": real, "audience": AUD, "discovery": True}]}})
    a = TokenAuthenticator(cfg)
    try:
        assert "cannot be loaded" in await rejected(a, sign(rsa_key, "r1", iss=real))
    finally:
        await a.close()


def test_issuer_config_defaults() -> None:
    c = OIDCIssuerConfig(issuer="https://kubernetes.default.svc", audiences=("x",))
    assert c.is_kubernetes and c.algorithms == ("RS256", "ES256")
