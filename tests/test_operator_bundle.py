"""The policy bundle compiler and the credentials Secret: pure functions, no cluster."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from pgwarden.connection import parse_connection
from pgwarden.operator import bundle, credentials
from pgwarden.operator.settings import InjectionSettings
from pgwarden.resources import document_from_object, parse_documents

CONN_RAW = {"apiVersion": "pgwarden.dev/v1alpha1", "kind": "DatabaseConnection",
            "metadata": {"name": "shop", "namespace": "agents", "uid": "u-1", "resourceVersion": "9",
                         "annotations": {"pgwarden.dev/last-handled-configuration": "{}"}},
            "spec": {"host": "db.prod", "port": 5432, "database": "shop", "sslMode": "verify-full",
                     "adminSecretRef": {"name": "admin"}},
            "status": {"phase": "Ready"}}
CONN = parse_connection(document_from_object(CONN_RAW))
SETTINGS = InjectionSettings()


def policy(name: str = "readers", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "pgwarden.dev/v1alpha1", "kind": "AccessPolicy", "metadata": {"name": name, "namespace": "agents"},
            "spec": {"connectionRef": {"name": "shop"}, "subjects": [{"group": "ai-agents"}],
                     "rules": [{"action": "allow", "operations": ["select"], "tables": ["public.customers"]}],
                     "defaultAction": "deny", **spec}}


def masking(name: str = "pii", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "pgwarden.dev/v1alpha1", "kind": "MaskingRule", "metadata": {"name": name, "namespace": "agents"},
            "spec": {"connectionRef": {"name": "shop"},
                     "columns": [{"table": "public.customers", "column": "email", "strategy": "email"}], **spec}}


def test_bundle_holds_connection_policies_masking_and_proxy_config() -> None:
    other = policy("elsewhere")
    other["spec"]["connectionRef"] = {"name": "other"}
    r = bundle.compile_bundle(CONN_RAW, [policy(), masking(), other], CONN, SETTINGS)
    assert r.data is not None and r.digest
    docs = parse_documents(r.data["bundle.yaml"] + "\n---\n" + r.data["proxy.yaml"])
    assert [d.kind for d in docs] == ["DatabaseConnection", "AccessPolicy", "MaskingRule", "ProxyConfig"]
    assert "adminSecretRef" not in docs[0].spec and "status" not in r.data["bundle.yaml"]
    assert "uid" not in r.data["bundle.yaml"] and "last-handled" not in r.data["bundle.yaml"]
    pc = docs[-1].spec
    assert pc["upstream"]["credentialsDir"] == "/etc/pgwarden/credentials"
    assert pc["listen"] == {"host": "127.0.0.1", "port": 5432} and pc["health"]["port"] == 8081


def test_the_proxy_accepts_the_bundle() -> None:
    proxy_config = pytest.importorskip("pgwarden.proxy.config")
    r = bundle.compile_bundle(CONN_RAW, [policy(), masking()], CONN, SETTINGS, has_ca=True)
    assert r.data is not None
    docs = parse_documents(r.data["bundle.yaml"] + "\n---\n" + r.data["proxy.yaml"])
    cfg = proxy_config.parse_proxy_config(docs)
    assert cfg.upstream.credentials_dir == "/etc/pgwarden/credentials"
    assert cfg.connection.host == "db.prod" and cfg.connection.ssl_root_cert == "/etc/pgwarden/credentials/sslrootcert"
    assert cfg.health_port == 8081 and cfg.health_host == "0.0.0.0"
    assert cfg.pod_identity is True and cfg.users == ()


def test_the_sidecar_config_is_complete_for_a_cluster() -> None:
    """podIdentity, audit on the proxy's emptyDir + stdout, recordings beside it, approvals as
    ApprovalRequests in the connection's namespace; no static users."""
    r = bundle.compile_bundle(CONN_RAW, [policy()], CONN, SETTINGS)
    assert r.data is not None
    spec = yaml.safe_load(r.data["proxy.yaml"])["spec"]
    assert spec["podIdentity"] is True and spec["users"] == []
    assert spec["audit"]["path"] == "/var/lib/pgwarden/audit.jsonl"
    assert spec["audit"]["stdout"] is True and spec["audit"]["otel"] is False
    # recordings: capped per session and in total, below their own volume's sizeLimit
    assert spec["recording"] == {"dir": "/var/lib/pgwarden/recordings", "maxBytesPerSession": "16Mi",
                                 "maxTotalBytes": 384 * 1024**2}
    assert spec["approvals"] == {"backend": "kubernetes", "namespace": "agents"}
    # the writable folder is the proxy's own emptyDir, and the only writable mount besides /tmp
    from pgwarden.operator import injection

    target = injection.InjectionTarget.for_connection("shop")
    sidecar = injection.proxy_container(target, SETTINGS, native=True)
    data = next(m for m in sidecar["volumeMounts"] if m["mountPath"] == "/var/lib/pgwarden")
    vol = next(v for v in injection.proxy_volumes(target, SETTINGS) if v["name"] == data["name"])
    assert "emptyDir" in vol and vol["emptyDir"]["sizeLimit"]
    assert spec["audit"]["path"].startswith(data["mountPath"] + "/")
    # the recordings have a volume of their own: they can never fill the audit log's (PW004 for all)
    rec = next(m for m in sidecar["volumeMounts"] if m["mountPath"] == spec["recording"]["dir"])
    rec_vol = next(v for v in injection.proxy_volumes(target, SETTINGS) if v["name"] == rec["name"])
    assert rec["name"] != data["name"] and rec_vol["emptyDir"]["sizeLimit"] == "512Mi"
    assert spec["recording"]["maxTotalBytes"] < injection.quantity_bytes(rec_vol["emptyDir"]["sizeLimit"])
    # the downward-API variables podIdentity reads
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["SERVICE_ACCOUNT"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.serviceAccountName"


def test_the_proxy_builds_a_server_from_the_bundle(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full validation by the proxy's own entry point (audit, recording, identity, masking,
    policies), then the approvals backend the sidecar would open inside the pod."""
    proxy_main = pytest.importorskip("pgwarden.proxy.main")
    from pgwarden.approvals import backend_from_config, kubernetes

    r = bundle.compile_bundle(CONN_RAW, [policy(approval={"reviewers": [{"group": "dba"}]}), masking()], CONN,
                              SETTINGS, has_ca=True)
    assert r.data is not None
    docs = parse_documents(r.data["bundle.yaml"] + "\n---\n" + r.data["proxy.yaml"])
    monkeypatch.setenv("POD_NAMESPACE", "agents")
    monkeypatch.setenv("SERVICE_ACCOUNT", "cursor-agent")
    server = proxy_main.build_server(docs)
    assert server.config.pod_identity is True
    rt = server.runtime
    assert rt.audit_config.path == "/var/lib/pgwarden/audit.jsonl" and rt.audit_config.stdout is True
    assert rt.recording_config.dir == "/var/lib/pgwarden/recordings"
    assert (rt.recording_config.max_bytes_per_session, rt.recording_config.max_total_bytes) == (
        16 * 1024**2, 384 * 1024**2)
    # what open_runtime builds inside the pod: the service account's own API access
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("t")
    (sa / "namespace").write_text("elsewhere")
    monkeypatch.setattr(kubernetes, "IN_CLUSTER_DIR", sa)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    backend = backend_from_config(rt.approvals_config)
    assert isinstance(backend, kubernetes.KubernetesApprovals)
    assert backend.namespace == "agents"


def test_digest_is_stable_and_changes_with_content() -> None:
    a = bundle.compile_bundle(CONN_RAW, [policy(), masking()], CONN, SETTINGS)
    b = bundle.compile_bundle(CONN_RAW, [masking(), policy()], CONN, SETTINGS)
    c = bundle.compile_bundle(CONN_RAW, [policy(defaultAction="review"), masking()], CONN, SETTINGS)
    assert a.digest == b.digest != c.digest


@pytest.mark.parametrize("bad", [
    masking(columns=[{"table": "customers", "column": "email"}]),  # not schema.table
    masking(detectors=["horoscope"]),
    policy(rules=[{"action": "maybe", "operations": ["select"], "tables": ["public.t"]}]),
    policy(defaultAction="shrug"),
])
def test_one_bad_object_means_no_bundle(bad: dict[str, Any]) -> None:
    r = bundle.compile_bundle(CONN_RAW, [policy("good"), masking("good-mask"), bad], CONN, SETTINGS)
    assert r.data is None and "last good bundle stays" in r.problem
    report = r.reports[(bad["kind"], bad["metadata"]["name"])]
    assert report.errors and not report.valid
    assert all(rep.valid for key, rep in r.reports.items() if key[1] != bad["metadata"]["name"])
    with pytest.raises(ValueError, match="no bundle"):
        bundle.bundle_configmap(CONN, r)


def test_validator_crash_is_not_published() -> None:
    def boom(docs: Any) -> None:
        raise RuntimeError("bug")

    r = bundle.compile_bundle(CONN_RAW, [policy()], CONN, SETTINGS, validators={"AccessPolicy": boom})
    assert r.data is None and "unexpectedly" in r.reports[("AccessPolicy", "readers")].errors[0]


def test_catalog_warnings() -> None:
    catalog = {"public.customers": {"id", "email"}}
    p = policy(rules=[{"action": "allow", "operations": ["select"], "tables": ["public.customers", "public.ghost"]}])
    m = masking(columns=[{"table": "public.customers", "column": "ssn"}])
    r = bundle.compile_bundle(CONN_RAW, [p, m], CONN, SETTINGS, catalog=catalog)
    assert r.data is not None  # warnings do not block
    assert r.reports[("AccessPolicy", "readers")].warnings == [
        "spec.rules[0].tables[1]: table public.ghost does not exist in the database (yet?)"]
    assert r.reports[("MaskingRule", "pii")].warnings == ["spec.columns[0]: column ssn does not exist in public.customers"]


def test_configmap_body() -> None:
    r = bundle.compile_bundle(CONN_RAW, [policy()], CONN, SETTINGS)
    cm = bundle.bundle_configmap(CONN, r, owner=CONN_RAW)
    assert cm["metadata"]["name"] == "shop-pgwarden-bundle" and cm["metadata"]["namespace"] == "agents"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert yaml.safe_load(cm["data"]["proxy.yaml"])["kind"] == "ProxyConfig"


class TestCredentialsSecret:
    def test_keys(self) -> None:
        s = credentials.credentials_secret(CONN, username="pgw_shop_b", password="p'w", version=7, owner=CONN_RAW)
        data = {k: credentials.unb64(v) for k, v in s["data"].items()}
        assert data == {"username": "pgw_shop_b", "password": "p'w", "version": "7", "host": "db.prod", "port": "5432",
                        "database": "shop", "sslmode": "verify-full", "sslrootcert": ""}
        assert s["metadata"]["name"] == "shop-pgwarden-credentials"
        assert credentials.secret_version(s) == 7

    def test_admin_secret_errors_say_what_to_do(self) -> None:
        with pytest.raises(ValueError, match="does not exist; create it with keys username and password"):
            credentials.read_admin_secret(None, "agents/admin")
        with pytest.raises(ValueError, match=r"lacks key\(s\) password \(it has: user, username\)"):
            credentials.read_admin_secret({"data": {"username": credentials.b64("a"), "user": "eA=="}}, "agents/admin")
        assert credentials.read_admin_secret({"stringData": {"username": "a", "password": "b", "sslrootcert": "PEM"}},
                                             "x") == ("a", "b", "PEM")


class TestOwnership:
    OWNER = {"kind": "DatabaseConnection", "metadata": {"name": "shop", "namespace": "agents", "uid": "u-1"}}

    def test_absent_or_ours_may_be_written(self) -> None:
        assert credentials.not_ours(None, self.OWNER) == ""
        ours = credentials.credentials_secret(CONN, username="u", password="p", version=1, owner=self.OWNER)
        assert credentials.not_ours(ours, self.OWNER) == ""

    @pytest.mark.parametrize("labels,refs,why", [
        ({}, [], "not made by pgwarden"),
        ({"app.kubernetes.io/managed-by": "pgwarden", "pgwarden.dev/connection": "other"}, [], "not made by pgwarden"),
        ({"app.kubernetes.io/managed-by": "pgwarden", "pgwarden.dev/connection": "shop"},
         [{"kind": "DatabaseConnection", "name": "shop", "uid": "u-old", "controller": True}], "controlled by"),
    ])
    def test_foreign_objects_are_refused(self, labels: dict[str, str], refs: list[dict[str, Any]], why: str) -> None:
        obj = {"kind": "Secret", "metadata": {"name": "shop-admin", "namespace": "agents", "labels": labels,
                                              "ownerReferences": refs}}
        assert why in credentials.not_ours(obj, self.OWNER)

    def test_drift_of_any_key_is_undone(self) -> None:
        r = bundle.compile_bundle(CONN_RAW, [policy()], CONN, SETTINGS)
        desired = bundle.bundle_configmap(CONN, r, CONN_RAW)
        assert bundle.configmap_drift(desired, desired) is None
        edited = {**desired, "data": {**desired["data"], "bundle.yaml": "loosened", "extra": "x"}}
        patch = bundle.configmap_drift(edited, desired)
        assert patch is not None and patch["data"]["extra"] is None
        assert patch["data"]["bundle.yaml"] == desired["data"]["bundle.yaml"]
