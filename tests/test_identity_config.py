"""The identity section is checked at load time: unsafe algorithms and unbound tokens are config errors."""

from __future__ import annotations

from typing import Any

import pytest

from pgwarden.identity import FailureBackoff, parse_identity_config, workload_from_env
from pgwarden.resources import ResourceError


def issuer(**over: Any) -> dict[str, Any]:
    d = {"issuer": "https://idp.example.com", "audience": "pgwarden", "discovery": True}
    d.update(over)
    return {"identity": {"oidc": [{k: v for k, v in d.items() if v is not None}]}}


def test_full_section() -> None:
    cfg = parse_identity_config({"identity": {
        "oidc": [{"issuer": "https://idp.example.com", "audience": ["pgwarden", "db"], "jwksUrl": "https://idp.example.com/k",
                  "algorithms": ["ES256"], "subjectClaim": "email", "groupsClaim": "realm_access.roles", "leeway": "10s"}],
        "tokenReview": {"enabled": True, "audiences": ["pgwarden"]},
        "staticUsers": [{"name": "dev", "password": "x", "groups": ["ai-agents"]}],
    }})
    (i,) = cfg.oidc
    assert i.audiences == ("pgwarden", "db") and i.algorithms == ("ES256",) and i.leeway == 10.0
    assert not i.is_kubernetes
    assert cfg.token_review.enabled and cfg.token_review.audiences == ("pgwarden",)
    assert cfg.static_users[0]["name"] == "dev"
    assert cfg.accepts_tokens


def test_missing_section_means_no_tokens() -> None:
    assert not parse_identity_config({}).accepts_tokens


@pytest.mark.parametrize(("over", "needle"), [
    ({"algorithms": ["HS256"]}, "HMAC"),
    ({"algorithms": ["none"]}, "unsigned"),
    ({"audience": None}, "audience"),
    ({"discovery": None}, "exactly one of"),
    ({"jwksFile": "/x.json"}, "exactly one of"),
    ({"issuer": "http://idp.example.com"}, "https"),
    ({"discovery": None, "jwksUrl": "http://idp.example.com/jwks"}, "https"),
    ({"leeway": "soon"}, "duration"),
    ({"subjectclaim": "email"}, "unknown field"),
    ({"issuer": "https://idp.example.com#x"}, "must not contain '#'"),
    ({"usernamePrefix": 3}, "printable string"),
    ({"groupsPrefix": "a\nb"}, "printable string"),
])
def test_rejected(over: dict[str, Any], needle: str) -> None:
    with pytest.raises(ResourceError, match=needle) as e:
        parse_identity_config(issuer(**over))
    assert "spec.identity.oidc[0]" in str(e.value)


def test_names_are_namespaced_by_issuer_by_default() -> None:
    idp, k8s = parse_identity_config({"identity": {"oidc": [
        {"issuer": "https://idp.example.com", "audience": "pgwarden", "discovery": True},
        {"issuer": "https://kubernetes.default.svc", "audience": "pgwarden", "discovery": True},
    ]}}).oidc
    assert (idp.user_prefix, idp.group_prefix) == ("https://idp.example.com#", "https://idp.example.com#")
    assert (k8s.user_prefix, k8s.group_prefix) == ("", "")  # the cluster's own system: names


@pytest.mark.parametrize(("first", "second", "key"), [
    ({"usernamePrefix": "corp:"}, {"usernamePrefix": "corp:"}, "usernamePrefix"),
    ({"groupsPrefix": "corp:"}, {"groupsPrefix": "corp:eu:"}, "groupsPrefix"),  # corp:'s group eu:dba = corp:eu:dba
    ({"usernamePrefix": ""}, {"usernamePrefix": ""}, "usernamePrefix"),  # two unprefixed issuers
    ({"kubernetes": True}, {"kubernetes": True}, "usernamePrefix"),  # two clusters' system:serviceaccount:…
    ({"kubernetes": True}, {"usernamePrefix": "sys", "groupsPrefix": "x:"}, "usernamePrefix"),  # sys + tem:…
    ({"usernamePrefix": ""}, {"usernamePrefix": "corp:"}, "usernamePrefix"),  # sub corp:alice
])
def test_colliding_prefixes_are_refused(first: dict[str, Any], second: dict[str, Any], key: str) -> None:
    with pytest.raises(ResourceError, match="collides") as e:
        parse_identity_config({"identity": {"oidc": [
            {"issuer": "https://a.example.com", "audience": "pgwarden", "discovery": True, **first},
            {"issuer": "https://b.example.com", "audience": "pgwarden", "discovery": True, **second},
        ]}})
    assert f"spec.identity.oidc[1].{key}" in str(e.value)


def test_one_unprefixed_idp_beside_the_cluster_is_fine() -> None:
    cfg = parse_identity_config({"identity": {"oidc": [
        {"issuer": "https://a.example.com", "audience": "pgwarden", "discovery": True, "usernamePrefix": "",
         "groupsPrefix": ""},
        {"issuer": "https://kubernetes.default.svc", "audience": "pgwarden", "discovery": True},
    ]}})
    assert [i.user_prefix for i in cfg.oidc] == ["", ""]


def test_tokenreview_needs_audiences() -> None:
    with pytest.raises(ResourceError, match="audiences"):
        parse_identity_config({"identity": {"tokenReview": {"enabled": True}}})


def test_workload_from_downward_api() -> None:
    w = workload_from_env({"POD_NAMESPACE": "agents", "POD_NAME": "cursor-7d9f", "POD_SERVICE_ACCOUNT": "cursor"})
    assert w.as_dict() == {"namespace": "agents", "pod": "cursor-7d9f", "service_account": "cursor"}
    assert workload_from_env({}).as_dict() == {}


def test_backoff_grows_and_forgets() -> None:
    b = FailureBackoff(free_failures=2, base=1.0, max_delay=8.0, forget_after=100.0)
    assert b.delay_for("10.0.0.1", 0) == 0
    assert [b.record_failure("10.0.0.1", 0) for _ in range(6)] == [0, 1, 2, 4, 8, 8]
    assert b.delay_for("10.0.0.1", 0) == 8
    assert b.delay_for("10.0.0.1", 5) == 3        # time already waited counts
    assert b.delay_for("10.0.0.2", 0) == 0        # per source
    b.record_failure("10.0.0.3", 0)
    b.record_failure("10.0.0.3", 0)
    b.record_failure("10.0.0.3", 0)
    assert b.failures("10.0.0.3", 50) == 3
    assert b.failures("10.0.0.3", 200) == 0       # quiet long enough: forgotten


def test_backoff_table_is_bounded() -> None:
    b = FailureBackoff(max_sources=100)
    for i in range(1000):
        b.record_failure(f"10.0.{i // 256}.{i % 256}", 0)
    assert b.failures("10.0.0.0", 0) == 0 and b.failures("10.0.3.231", 0) == 1
