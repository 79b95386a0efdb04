"""The one deep merge the operator uses for injection, merge patches and kopf's patch."""

from __future__ import annotations

from pgwarden.k8s.merge import merge_into


def test_nested_mappings_merge_and_other_values_replace() -> None:
    dst = {"metadata": {"labels": {"a": "1"}, "name": "x"}, "spec": {"containers": [1]}}
    merge_into(dst, {"metadata": {"labels": {"b": "2"}}, "spec": {"containers": [2]}})
    assert dst == {"metadata": {"labels": {"a": "1", "b": "2"}, "name": "x"}, "spec": {"containers": [2]}}


def test_a_merge_patch_deletes_on_none_and_a_patch_keeps_it() -> None:
    obj = {"spec": {"decision": "approved", "reason": "ok"}}
    merge_into(obj, {"spec": {"reason": None}}, none_deletes=True)
    assert obj == {"spec": {"decision": "approved"}}
    patch: dict[str, object] = {"metadata": {"annotations": {"a": "1"}}}
    merge_into(patch, {"metadata": {"annotations": {"b": None}}})
    assert patch == {"metadata": {"annotations": {"a": "1", "b": None}}}  # kopf's patch: "remove b"


def test_the_result_shares_no_list_with_the_source() -> None:
    src = {"spec": {"volumes": [{"name": "v"}]}}
    dst: dict[str, object] = {}
    merge_into(dst, src)
    src["spec"]["volumes"].append({"name": "w"})
    assert dst == {"spec": {"volumes": [{"name": "v"}]}}


def test_the_in_cluster_url_brackets_an_ipv6_service_host() -> None:
    from pgwarden.k8s.client import in_cluster_server

    assert in_cluster_server("10.96.0.1", "443") == "https://10.96.0.1:443"
    assert in_cluster_server("fd00:10:96::1", "443") == "https://[fd00:10:96::1]:443"


def test_a_name_is_one_path_segment() -> None:
    from pgwarden.k8s.client import path

    assert path("v1", "secrets", "ns", "a/../../b") == "/api/v1/namespaces/ns/secrets/a%2F..%2F..%2Fb"
    assert path("pgwarden.dev/v1alpha1", "approvalrequests", "x/y") == "/apis/pgwarden.dev/v1alpha1/namespaces/x%2Fy/approvalrequests"
