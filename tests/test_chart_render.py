"""The Helm chart, rendered by real helm: lint, Kubernetes API schemas, and what a security
reviewer checks before installing an operator that can read Secrets and mutate pods."""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_helpers import (
    CHART,
    NAMESPACE,
    RELEASE,
    ROOT,
    Manifest,
    grants,
    of_kind,
    one,
    render,
    run_helm,
    set_args,
)
from cryptography.hazmat.primitives import serialization

# the values CI renders: the defaults, and the options a hardened install turns on
HARDENED = {"webhook.certManager.enabled": True, "networkPolicy.enabled": True}
NAMESPACED = {"operator.watchNamespaces": ["agents", "ci"]}
WITH_PEOPLE = {
    "rbac.reviewers": [{"kind": "Group", "name": "dba"}],
}
VARIANTS: dict[str, dict[str, Any]] = {"default": {}, "hardened": HARDENED, "namespaced": NAMESPACED, "people": WITH_PEOPLE}

# Kubernetes versions the chart supports (Chart.yaml kubeVersion >= 1.29: native sidecars)
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
# objects of CRDs that are not part of Kubernetes' own API
CUSTOM_KINDS = {"ClusterKopfPeering", "KopfPeering", "Certificate", "Issuer"}
OPERATOR = f"{RELEASE}-pgwarden-operator"


def crd_schemas(docs: list[Manifest]) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of every CRD the chart installs."""
    out = {}
    for crd in of_kind(docs, "CustomResourceDefinition"):
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


# -- helm itself -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["default", "hardened"])
def test_helm_lint_passes(variant: str) -> None:
    from chart_helpers import set_args

    proc = run_helm("lint", str(CHART), "--strict", "--namespace", NAMESPACE, *set_args(VARIANTS[variant]))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_crds_are_the_top_level_crds_not_copies() -> None:
    """One source of truth: each product CRD in the chart is a symlink to crds/, and every
    top-level CRD is in the chart (a new CRD cannot be forgotten)."""
    top = {p.name for p in (ROOT / "crds").glob("*.yaml")}
    chart_dir = CHART / "crds"
    linked = {p.name for p in chart_dir.iterdir() if p.is_symlink()}
    assert linked == top, f"charts/pgwarden/crds links {sorted(linked)}, crds/ has {sorted(top)}"
    for name in top:
        link = chart_dir / name
        assert link.resolve() == (ROOT / "crds" / name).resolve(), f"{link} points at {link.resolve()}"
    real_files = {p.name for p in chart_dir.iterdir() if not p.is_symlink()}
    assert real_files == {"kopf-peering.yaml"}, "only kopf's peering CRDs belong to the chart itself"


def test_helm_follows_the_crd_symlinks() -> None:
    docs = render(include_crds=True)
    names = {d["metadata"]["name"] for d in of_kind(docs, "CustomResourceDefinition")}
    expected = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in (ROOT / "crds").glob("*.yaml")}
    assert expected <= names
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= names


# -- schemas -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_api(variant: str, k8s_version: str) -> None:
    docs = render(VARIANTS[variant], include_crds=True)
    checked = 0
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']} {doc['metadata'].get('name')} (k8s {k8s_version}): {e.message}")
        checked += 1
    assert checked >= 12


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_custom_objects_validate_against_their_crds(variant: str) -> None:
    docs = render(VARIANTS[variant], include_crds=True)
    schemas = crd_schemas(docs)
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in schemas:
            jsonschema.validate(doc, schemas[key])
        elif doc["kind"] in ("Certificate", "Issuer"):  # cert-manager's CRDs are not installed by us
            assert doc["apiVersion"] == "cert-manager.io/v1"


def test_examples_validate_against_the_crds_the_chart_installs() -> None:
    schemas = crd_schemas(render(include_crds=True))
    seen = set()
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            key = (doc.get("apiVersion"), doc.get("kind"))
            if key in schemas:
                try:
                    jsonschema.validate(doc, schemas[key])
                except jsonschema.ValidationError as e:
                    pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {e.message}")
                seen.add(doc["kind"])
            elif doc.get("apiVersion", "").startswith("pgwarden.dev/") or doc.get("kind") == "ProxyConfig":
                continue  # ProxyConfig configures the standalone proxy; it is no cluster object
            else:
                kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)
    assert {"DatabaseConnection", "AccessPolicy", "MaskingRule"} <= seen


# -- the operator's pods -----------------------------------------------------------------------

def operator_deployment(values: dict[str, Any] | None = None) -> Manifest:
    return one(render(values), "Deployment", OPERATOR)


def test_two_replicas_spread_with_a_disruption_budget() -> None:
    docs = render()
    dep = one(docs, "Deployment", OPERATOR)
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    anti = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    # kopf peering: the object both replicas record themselves in
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == f"{RELEASE}-pgwarden"


def test_operator_pod_is_hardened() -> None:
    spec = operator_deployment()["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["resources"]["requests"] and c["resources"]["limits"]
        assert c["livenessProbe"] and c["readinessProbe"] and c["startupProbe"]
        assert not c["image"].endswith(":latest")
    # the only writable paths are memory-backed and bounded
    for v in spec["volumes"]:
        if "emptyDir" in v:
            assert v["emptyDir"].get("sizeLimit")
    assert all("hostPath" not in v for v in spec["volumes"])
    assert not spec.get("hostNetwork") and not spec.get("hostPID")


def test_liveness_probe_matches_the_operator_liveness_endpoint() -> None:
    c = operator_deployment()["spec"]["template"]["spec"]["containers"][0]
    liveness = [a for a in c["args"] if a.startswith("--liveness=")]
    assert liveness == ["--liveness=http://0.0.0.0:8080/healthz"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["health"] == 8080
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_values_reach_the_operator_as_the_settings_it_reads() -> None:
    dep = operator_deployment({"image.proxy.tag": "9.9.9", "sidecar.resources.limits.memory": "300Mi",
                               "otel.endpoint": "http://collector:4318"})
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PGWARDEN_PROXY_IMAGE"] == "ghcr.io/pgwarden/pgwarden-proxy:9.9.9"
    assert env["PGWARDEN_SIDECAR_MEMORY_LIMIT"] == "300Mi"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"
    # the operator's own settings loader turns the rendered env into the intended settings
    from pgwarden.operator.settings import OperatorSettings

    s = OperatorSettings.from_env({k: v for k, v in env.items() if v is not None})
    assert s.injection.image.endswith(":9.9.9")
    assert s.injection.resources.memory_limit == "300Mi"
    assert s.webhook.port == 9443 and s.webhook.certfile == "/etc/pgwarden/webhook/tls.crt"
    assert s.webhook.managed is None, "the chart owns the webhook configurations; kopf must not patch them"


def test_every_pgwarden_variable_the_chart_sets_is_read_by_the_operator() -> None:
    dep = operator_deployment({"otel.endpoint": "http://collector:4318"})
    names = {e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    source = "\n".join(p.read_text() for p in (ROOT / "operator").rglob("*.py"))
    unread = {n for n in names if n.startswith("PGWARDEN_") and f'"{n}"' not in source}
    assert unread == set()


def test_audit_and_otel_values_reach_the_injected_sidecar() -> None:
    """audit.* and otel.endpoint travel chart -> operator env -> settings -> the sidecar's
    proxy.yaml and environment."""
    from pgwarden.connection import parse_connection
    from pgwarden.operator import bundle, injection
    from pgwarden.operator.settings import OperatorSettings
    from pgwarden.resources import document_from_object

    dep = operator_deployment({"audit.stdout": False, "audit.otel": True, "otel.endpoint": "http://collector:4318"})
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    inj = OperatorSettings.from_env({k: v for k, v in env.items() if v is not None}).injection
    assert (inj.audit_stdout, inj.audit_otel, inj.otel_endpoint) == (False, True, "http://collector:4318")
    conn = parse_connection(document_from_object({
        "apiVersion": "pgwarden.dev/v1alpha1", "kind": "DatabaseConnection",
        "metadata": {"name": "orders-prod", "namespace": "agents"},
        "spec": {"host": "db", "database": "orders"}}))
    audit = bundle.proxy_config_object(conn, inj)["spec"]["audit"]
    assert audit["stdout"] is False and audit["otel"] is True
    sidecar = injection.proxy_container(injection.InjectionTarget.for_connection("orders-prod"), inj, native=True)
    assert {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://collector:4318"} in sidecar["env"]
    # chart defaults: stdout on (cluster logging), no OTLP
    dep = operator_deployment()
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    inj = OperatorSettings.from_env({k: v for k, v in env.items() if v is not None}).injection
    assert (inj.audit_stdout, inj.audit_otel, inj.otel_endpoint) == (True, False, "")
    sidecar = injection.proxy_container(injection.InjectionTarget.for_connection("orders-prod"), inj, native=True)
    assert all(e["name"] != "OTEL_EXPORTER_OTLP_ENDPOINT" for e in sidecar["env"])


def test_webhook_certificate_is_mounted_read_only_from_the_chart_secret() -> None:
    docs = render()
    spec = one(docs, "Deployment", OPERATOR)["spec"]["template"]["spec"]
    vol = next(v for v in spec["volumes"] if v["name"] == "webhook-tls")
    secret = one(docs, "Secret")
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "webhook-tls")
    assert mount["readOnly"] is True and mount["mountPath"] == "/etc/pgwarden/webhook"


# -- RBAC --------------------------------------------------------------------------------------

def all_roles(docs: list[Manifest]) -> list[Manifest]:
    return of_kind(docs, "ClusterRole") + of_kind(docs, "Role")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_wildcards_and_no_escalation_verbs(variant: str) -> None:
    for role in all_roles(render(VARIANTS[variant])):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{role['kind']} {role['metadata']['name']}: * in {field}"
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])
            assert "nonResourceURLs" not in rule


def test_operator_rbac_is_exactly_what_the_code_calls() -> None:
    role = one(render(), "ClusterRole", OPERATOR)
    pgw = "pgwarden.dev"
    for plural in ("databaseconnections", "accesspolicies", "maskingrules", "approvalrequests"):
        assert grants(role, pgw, plural) >= {"get", "list", "watch", "patch"}
        assert grants(role, pgw, f"{plural}/status") == {"get", "patch"}
        assert "update" not in grants(role, pgw, plural)
        assert "create" not in grants(role, pgw, plural) or plural == "approvalrequests"
    # blockOwnerDeletion on the Secret and ConfigMap a connection owns (OwnerReferencesPermissionEnforcement)
    assert grants(role, pgw, "databaseconnections/finalizers") == {"update"}
    from pgwarden.operator.credentials import owner_reference

    (ref,) = owner_reference({"kind": "DatabaseConnection", "metadata": {"name": "c", "uid": "u"}})
    assert ref["blockOwnerDeletion"] is True and ref["kind"] == "DatabaseConnection"
    # create: the approvals gateway files requests for the sidecars (after a TokenReview)
    assert grants(role, pgw, "approvalrequests") == {"get", "list", "watch", "patch", "create", "delete"}
    assert grants(role, "authentication.k8s.io", "tokenreviews") == {"create"}
    # Secrets: read the admin Secret, write the rotating one; never list or watch them all
    assert grants(role, "", "secrets") == {"get", "create", "patch", "delete"}
    assert grants(role, "", "configmaps") == {"get", "create", "patch", "delete"}
    assert grants(role, "", "events") == {"create", "get"}
    # pods are only seen through admission, never read through the API
    assert grants(role, "", "pods") == set()
    assert grants(role, "", "pods/exec") == set()
    for group, plural in (("apps", "deployments"), ("apps", "statefulsets"), ("apps", "daemonsets"),
                          ("batch", "jobs"), ("batch", "cronjobs")):
        assert grants(role, group, plural) == {"list", "watch", "patch"}
    # the chart owns the webhook configurations: the operator cannot rewrite them
    assert grants(role, "admissionregistration.k8s.io", "mutatingwebhookconfigurations") == set()
    assert grants(role, "admissionregistration.k8s.io", "validatingwebhookconfigurations") == set()
    assert grants(role, "rbac.authorization.k8s.io", "clusterroles") == set()
    # kopf peering: the chart's one peering object is the only one written
    writes = [r for r in role["rules"] if "clusterkopfpeerings" in r["resources"] and "patch" in r["verbs"]]
    assert writes and all(r.get("resourceNames") == [f"{RELEASE}-pgwarden"] for r in writes)


def test_namespaced_install_grants_nothing_cluster_wide_but_discovery() -> None:
    docs = render(NAMESPACED)
    cluster = one(docs, "ClusterRole", OPERATOR)
    # discovery, and TokenReview (cluster-scoped by nature) for the approvals gateway
    assert {g for r in cluster["rules"] for g in r["apiGroups"]} == {"apiextensions.k8s.io", "authentication.k8s.io"}
    roles = of_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["agents", "ci"]
    for role in roles:
        assert grants(role, "", "secrets") == {"get", "create", "patch", "delete"}
        assert grants(role, "kopf.dev", "kopfpeerings") >= {"list", "watch", "patch"}
    peerings = of_kind(docs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["agents", "ci"]
    assert not of_kind(docs, "ClusterKopfPeering")
    args = one(docs, "Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=agents" in args and "--namespace=ci" in args


def test_reviewer_can_patch_approvals_and_agents_need_no_role() -> None:
    """The sidecar reaches ApprovalRequests through the operator's approvals gateway with its own
    token: no role for agents' service accounts, which every container of the pod shares."""
    docs = render(WITH_PEOPLE)
    reviewer = one(docs, "ClusterRole", f"{RELEASE}-pgwarden-reviewer")
    assert grants(reviewer, "pgwarden.dev", "approvalrequests") == {"get", "list", "watch", "patch"}
    assert grants(reviewer, "", "secrets") == set()
    assert grants(reviewer, "pgwarden.dev", "accesspolicies") == set()
    for role in all_roles(docs):
        assert "agent" not in role["metadata"]["name"], role["metadata"]["name"]
    assert not [b for b in of_kind(docs, "RoleBinding") if b["roleRef"]["name"].startswith("pgwarden-agent")]
    crb = one(docs, "ClusterRoleBinding", f"{RELEASE}-pgwarden-reviewer")
    assert crb["subjects"] == [{"kind": "Group", "name": "dba", "apiGroup": "rbac.authorization.k8s.io"}]


@pytest.mark.parametrize("value,expected", [(None, None), (1000, 1000)])
def test_sidecar_run_as_user_can_be_left_to_the_platform(value: int | None, expected: int | None) -> None:
    from pgwarden.operator.settings import OperatorSettings

    dep = operator_deployment({"sidecar.runAsUser": value})
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    assert OperatorSettings.from_env(env).injection.run_as_user == expected


def test_cluster_scoped_names_carry_the_release() -> None:
    """Two releases in one cluster must not fight over a ClusterRole or a peering object; for a
    release named pgwarden the names stay the documented ones (pgwarden-reviewer, pgwarden)."""
    for release in ("pgw", "other"):
        proc = run_helm("template", release, str(CHART), "--namespace", NAMESPACE,
                        *set_args({"rbac.reviewers": [{"kind": "Group", "name": "dba"}]}))
        assert proc.returncode == 0, proc.stderr
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
        cluster_scoped = [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering",
                                                           "MutatingWebhookConfiguration",
                                                           "ValidatingWebhookConfiguration")]
        assert cluster_scoped and all(d["metadata"]["name"].startswith(f"{release}-") for d in cluster_scoped)
        env = {e["name"]: e.get("value") for e in
               one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["PGWARDEN_PEERING_NAME"] == one(docs, "ClusterKopfPeering")["metadata"]["name"]
    proc = run_helm("template", "pgwarden", str(CHART), "--namespace", NAMESPACE)
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert one(docs, "ClusterRole", "pgwarden-reviewer") and one(docs, "ClusterKopfPeering", "pgwarden")


def test_workload_rights_only_with_the_carry_feature() -> None:
    from pgwarden.operator.settings import OperatorSettings

    docs = render({"operator.carryWorkloadAnnotations": False})
    role = one(docs, "ClusterRole", OPERATOR)
    for group, plural in (("apps", "deployments"), ("apps", "statefulsets"), ("apps", "daemonsets"),
                          ("batch", "jobs"), ("batch", "cronjobs")):
        assert grants(role, group, plural) == set()
    env = {e["name"]: e.get("value") for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert OperatorSettings.from_env({k: v for k, v in env.items() if v is not None}).carry_annotations is False
    # and the operator then registers no workload watch (it would be forbidden)
    import kopf

    from pgwarden.k8s.client import ApiConfig, Kube
    from pgwarden.operator import main as operator_main
    from pgwarden.operator.runtime import Runtime

    for carry, expected in ((True, True), (False, False)):
        registry = kopf.OperatorRegistry()
        operator_main.register(registry, Runtime(OperatorSettings(carry_annotations=carry),
                                                 Kube(ApiConfig(server="http://unused"))))
        watched = {s.any_name for s in registry._changing.get_all_selectors()}
        assert ("deployments" in watched) is expected


def test_the_approvals_gateway_is_served_and_configured() -> None:
    docs = render()
    dep = one(docs, "Deployment", OPERATOR)
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PGWARDEN_GATEWAY"] == "true" and env["PGWARDEN_GATEWAY_PORT"] == "9444"
    assert env["PGWARDEN_APPROVALS_URL"] == f"https://{RELEASE}-pgwarden-webhook.{NAMESPACE}.svc:9444"
    assert env["PGWARDEN_OPERATOR_USERNAME"] == f"system:serviceaccount:{NAMESPACE}:{RELEASE}-pgwarden"
    assert env["PGWARDEN_GATEWAY_CAFILE"] == "/etc/pgwarden/webhook/ca.crt"
    assert {"name": "approvals", "containerPort": 9444, "protocol": "TCP"} in container["ports"]
    svc = one(docs, "Service", f"{RELEASE}-pgwarden-webhook")
    assert {"name": "https-approvals", "port": 9444, "targetPort": "approvals", "protocol": "TCP"} in svc["spec"]["ports"]
    # the settings the operator reads from that env
    from pgwarden.operator.settings import OperatorSettings

    settings = OperatorSettings.from_env({k: v for k, v in env.items() if v is not None})
    assert settings.gateway.enabled and settings.gateway.port == 9444
    assert settings.injection.approvals_url == env["PGWARDEN_APPROVALS_URL"]
    assert settings.operator_username == env["PGWARDEN_OPERATOR_USERNAME"]
    policy = one(render(HARDENED), "NetworkPolicy", OPERATOR)
    assert {"port": 9444, "protocol": "TCP"} in [p for rule in policy["spec"]["ingress"] for p in rule["ports"]]


# -- webhooks ----------------------------------------------------------------------------------

def kopf_webhooks() -> dict[str, list[dict[str, Any]]]:
    """What kopf itself would put into the configurations for the operator's real registry,
    merged by webhook name (kopf emits one entry per resource for a shared handler id)."""
    import kopf
    from kopf._cogs.structs import references
    from kopf._core.engines import admission
    from kopf._core.intents import causes

    from pgwarden.k8s.client import ApiConfig, Kube
    from pgwarden.operator import main as operator_main
    from pgwarden.operator.runtime import Runtime
    from pgwarden.operator.settings import OperatorSettings

    registry = kopf.OperatorRegistry()
    operator_main.register(registry, Runtime(OperatorSettings(), Kube(ApiConfig(server="http://unused"))))
    resources = [references.Resource(group=g, version=v, plural=p, namespaced=True) for g, v, p in (
        ("", "v1", "pods"), ("apps", "v1", "deployments"), ("apps", "v1", "statefulsets"),
        ("apps", "v1", "daemonsets"), ("batch", "v1", "jobs"), ("batch", "v1", "cronjobs"),
        ("pgwarden.dev", "v1alpha1", "approvalrequests"), ("pgwarden.dev", "v1alpha1", "accesspolicies"),
        ("pgwarden.dev", "v1alpha1", "databaseconnections"), ("pgwarden.dev", "v1alpha1", "maskingrules"))]
    handlers = registry._webhooks.get_all_handlers()
    out: dict[str, list[dict[str, Any]]] = {}
    for reason, kind in ((causes.WebhookType.MUTATING, "MutatingWebhookConfiguration"),
                         (causes.WebhookType.VALIDATING, "ValidatingWebhookConfiguration")):
        merged: dict[str, dict[str, Any]] = {}
        for w in admission.build_webhooks([h for h in handlers if h.reason == reason], resources=resources,
                                          name_suffix="pgwarden.dev", client_config={"service": {"name": "x"}}):
            if w["name"] in merged:
                merged[w["name"]]["rules"] += w["rules"]
            else:
                merged[w["name"]] = w
        out[kind] = list(merged.values())
    return out


def rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    return {(g, v, r, op) for rule in rules for g in rule["apiGroups"] for v in rule["apiVersions"]
            for r in rule["resources"] for op in rule["operations"]}


def test_webhook_configurations_match_the_operators_handlers() -> None:
    docs = render()
    expected = kopf_webhooks()
    for kind, kopf_hooks in expected.items():
        config = one(docs, kind)
        ours = {w["name"]: w for w in config["webhooks"]}
        assert set(ours) == {w["name"] for w in kopf_hooks}, f"{kind}: chart and operator disagree on webhooks"
        for k in kopf_hooks:
            w = ours[k["name"]]
            assert w["clientConfig"]["service"]["path"] == k["clientConfig"]["service"]["path"], k["name"]
            if k["name"].startswith("pgwarden-inject."):
                # kopf cannot express matchConditions, so the configuration it would manage itself
                # fails open; the chart narrows the webhook to annotated pods and fails closed
                assert (k["failurePolicy"], w["failurePolicy"]) == ("Ignore", "Fail")
                assert w["matchConditions"]
            else:
                assert w["failurePolicy"] == k["failurePolicy"], k["name"]
            assert w["sideEffects"] == k["sideEffects"], k["name"]
            assert rule_set(w["rules"]) == rule_set(k["rules"]), k["name"]


def test_webhooks_reach_the_operator_service_with_the_right_ca() -> None:
    from cryptography import x509

    docs = render()
    svc = one(docs, "Service")
    dep = one(docs, "Deployment", OPERATOR)
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "webhook"
    secret = one(docs, "Secret")
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert f"{svc['metadata']['name']}.{NAMESPACE}.svc" in sans
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        for w in one(docs, kind)["webhooks"]:
            assert w["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
            assert w["clientConfig"]["service"]["name"] == svc["metadata"]["name"]
            assert w["clientConfig"]["service"]["namespace"] == NAMESPACE
            assert "url" not in w["clientConfig"]
            assert w["timeoutSeconds"] <= 30


def test_pod_injection_skips_system_namespaces_and_the_operator_itself() -> None:
    hooks = {w["name"]: w for w in one(render(), "MutatingWebhookConfiguration")["webhooks"]}
    expr = hooks["pgwarden-inject.pgwarden.dev"]["namespaceSelector"]["matchExpressions"][0]
    assert expr["operator"] == "NotIn" and {"kube-system", NAMESPACE} <= set(expr["values"])
    # injection fails closed, narrowed to the pods that ask for it; approvals fail closed: nobody
    # decides while the operator is away
    assert hooks["pgwarden-inject.pgwarden.dev"]["failurePolicy"] == "Fail"
    assert hooks["pgwarden-approval-decide.pgwarden.dev"]["failurePolicy"] == "Fail"
    assert hooks["pgwarden-inject.pgwarden.dev"]["timeoutSeconds"] <= 5


def match_conditions_pass(webhook: Manifest, obj: Manifest) -> bool:
    """The API server's evaluation of matchConditions: every expression true (CEL, celpy)."""
    import celpy

    env = celpy.Environment()
    for cond in webhook.get("matchConditions") or []:
        program = env.program(env.compile(cond["expression"]))
        if not bool(program.evaluate({"object": celpy.json_to_cel(obj)})):
            return False
    return True


@pytest.mark.parametrize("annotations,sent", [
    ({"pgwarden.dev/inject": "orders-prod"}, True),
    ({"pgwarden.dev/inject": "orders-prod", "pgwarden.dev/injected": "orders-prod"}, False),
    ({"team": "x"}, False),
    (None, False),
])
def test_only_pods_that_ask_for_the_proxy_reach_the_fail_closed_webhook(annotations: Any, sent: bool) -> None:
    hooks = {w["name"]: w for w in one(render(), "MutatingWebhookConfiguration")["webhooks"]}
    pod: Manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "a-"}, "spec": {}}
    if annotations is not None:
        pod["metadata"]["annotations"] = annotations
    assert match_conditions_pass(hooks["pgwarden-inject.pgwarden.dev"], pod) is sent
    vhooks = {w["name"]: w for w in one(render(), "ValidatingWebhookConfiguration")["webhooks"]}
    injected = bool(annotations and "pgwarden.dev/injected" in annotations)
    assert match_conditions_pass(vhooks["pgwarden-ephemeral.pgwarden.dev"], pod) is injected


def test_readiness_is_an_https_check_of_both_servers() -> None:
    probe = operator_deployment()["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"] == {"path": "/readyz", "port": "approvals", "scheme": "HTTPS"}


def test_approval_webhooks_cover_every_namespace() -> None:
    """An ApprovalRequest in an excluded namespace would skip the approver checks."""
    docs = render()
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        for w in one(docs, kind)["webhooks"]:
            if "approval" in w["name"]:
                assert "namespaceSelector" not in w, w["name"]
                assert w["failurePolicy"] == "Fail"


def test_cert_manager_mode_injects_the_ca_and_generates_no_key() -> None:
    docs = render(HARDENED)
    assert not of_kind(docs, "Secret"), "with cert-manager the chart must not generate a private key"
    cert = one(docs, "Certificate", f"{RELEASE}-pgwarden-webhook")
    svc = one(docs, "Service")["metadata"]["name"]
    assert f"{svc}.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]
    # renewals keep the CA: the serving certificate is signed by a CA Issuer, whose CA comes from
    # a self-signed Issuer once and is never re-keyed
    ca_cert = one(docs, "Certificate", f"{RELEASE}-pgwarden-webhook-ca")
    assert ca_cert["spec"]["isCA"] is True and ca_cert["spec"]["privateKey"]["rotationPolicy"] == "Never"
    ca_issuer = one(docs, "Issuer", f"{RELEASE}-pgwarden-ca")
    assert ca_issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"]
    assert cert["spec"]["issuerRef"] == {"name": ca_issuer["metadata"]["name"], "kind": "Issuer"}
    assert one(docs, "Issuer", f"{RELEASE}-pgwarden-selfsigned")["spec"] == {"selfSigned": {}}
    assert ca_cert["spec"]["issuerRef"]["name"] == f"{RELEASE}-pgwarden-selfsigned"
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        config = one(docs, kind)
        assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
            f"{NAMESPACE}/{cert['metadata']['name']}"
        assert all("caBundle" not in w["clientConfig"] for w in config["webhooks"])
    secret_name = one(docs, "Deployment", OPERATOR)["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"]
    assert secret_name == cert["spec"]["secretName"]


def ca_pems() -> tuple[str, str, str]:
    """(CA cert, CA key, another CA cert) in PEM, as a user keeps them in a secret store."""
    from pgwarden.operator.webhook_server import self_signed

    cert, key = self_signed(["pgwarden-webhook-ca"])
    other, _ = self_signed(["pgwarden-webhook-ca-old"])
    return cert.decode(), key.decode(), other.decode()


def ca_bundles(docs: list[Manifest]) -> set[str]:
    return {w["clientConfig"]["caBundle"] for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
            for w in one(docs, kind)["webhooks"]}


def test_a_given_ca_keeps_the_ca_bundle_stable_across_helm_template_runs() -> None:
    """GitOps renders with `helm template` (lookup finds nothing) at every sync: with webhook.tls.ca
    the caBundle is the same each time, and each run's serving certificate verifies under it, so
    replacing the Secret never leaves the API server or the sidecars distrusting the server."""
    from cryptography import x509

    ca_cert, ca_key, _ = ca_pems()
    values = {"webhook.tls.ca.cert": ca_cert, "webhook.tls.ca.key": ca_key}
    runs = []
    for _ in range(2):
        proc = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *set_args(values))
        assert proc.returncode == 0, proc.stderr
        runs.append([d for d in yaml.safe_load_all(proc.stdout) if d])
    bundles = [ca_bundles(docs) for docs in runs]
    assert bundles[0] == bundles[1] and len(bundles[0]) == 1
    (bundle,) = bundles[0]
    assert base64.b64decode(bundle).decode().strip() == ca_cert.strip()
    ca = x509.load_pem_x509_certificate(ca_cert.encode())
    for docs in runs:
        secret = one(docs, "Secret")
        assert secret["data"]["ca.crt"] == bundle
        x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"])).verify_directly_issued_by(ca)


def test_the_old_ca_stays_trusted_while_rotating() -> None:
    """Overlap: during a CA rotation the caBundle (and the sidecars' CA file) holds both CAs."""
    from cryptography import x509

    ca_cert, ca_key, old = ca_pems()
    docs = render({"webhook.tls.ca.cert": ca_cert, "webhook.tls.ca.key": ca_key, "webhook.tls.extraCABundle": old})
    (bundle,) = ca_bundles(docs)
    certs = x509.load_pem_x509_certificates(base64.b64decode(bundle))
    assert [c.public_bytes(serialization.Encoding.PEM).decode() for c in certs] == [ca_cert, old]
    assert one(docs, "Secret")["data"]["ca.crt"] == bundle


def test_a_generated_ca_changes_per_render_and_notes_say_so() -> None:
    """Without a given CA or cert-manager, `helm template` cannot keep the CA: documented."""
    a = ca_bundles(render({"operator.replicaCount": 2}))
    proc = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE)
    b = ca_bundles([d for d in yaml.safe_load_all(proc.stdout) if d])
    assert a != b
    proc = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert "webhook.tls.ca" in proc.stdout.split("NOTES:", 1)[1]
    proc = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *set_args({"webhook.tls.ca.cert": "x"}))
    assert proc.returncode != 0 and "needs both cert and key" in proc.stderr


def test_network_policy_limits_ingress_to_the_webhook_and_gateway_ports() -> None:
    docs = render(HARDENED)
    np = one(docs, "NetworkPolicy")
    assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = [p["port"] for rule in np["spec"]["ingress"] for p in rule["ports"]]
    assert ingress_ports == [9443, 9444]
    egress_ports = {p["port"] for rule in np["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 443, 6443, 5432}
    assert not of_kind(render(), "NetworkPolicy"), "off by default"


# -- NOTES -------------------------------------------------------------------------------------

def test_notes_give_the_next_three_commands() -> None:
    from chart_helpers import set_args

    proc = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                    *set_args(WITH_PEOPLE))
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply -f examples/" in notes
    assert "kubectl -n agents annotate deployment cursor-agent pgwarden.dev/inject=orders-prod" in notes
    assert re.search(r"kubectl -n agents patch approvalrequest NAME --type merge -p "
                     r"'\{\"spec\":\{\"decision\":\"approved\"\}\}'", notes)
    for path in re.findall(r"examples/[\w.-]+\.yaml", notes):
        assert (ROOT / path).exists(), f"NOTES name {path}, which does not exist"
    for path in re.findall(r"docs/[\w.-]+\.md", notes):
        assert Path(ROOT / path).exists(), f"NOTES name {path}, which does not exist"


@pytest.mark.parametrize("values", [
    {"webhook.certmanager.enabled": True},              # a typo must not silently keep the default
    {"operator.replicaCount": 0},
    {"operator.watchNamespaces": ["Agents"]},            # not a namespace name
    {"rbac.agents": [{"namespace": "agents", "serviceAccount": "a"}]},  # agents need no RBAC any more
    {"otel.endpoint": "collector:4318"},                 # OTLP over HTTP needs a scheme
])
def test_values_schema_rejects_mistakes(values: dict[str, Any]) -> None:
    from chart_helpers import set_args

    proc = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *set_args(values))
    assert proc.returncode != 0 and "schema" in proc.stderr, proc.stderr


def test_sample_agent_injected_with_the_charts_settings_is_a_valid_hardened_pod() -> None:
    """The chart's env -> the operator's settings -> the webhook's mutation of the sample agent:
    the result is valid for Kubernetes 1.29 and keeps the credentials out of the agent."""
    from pgwarden.operator.injection import InjectionTarget, inject_manifest
    from pgwarden.operator.settings import OperatorSettings

    dep = operator_deployment({"image.proxy.tag": "1.2.3"})
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    settings = OperatorSettings.from_env(env).injection
    docs = list(yaml.safe_load_all((ROOT / "examples" / "agent-deployment.yaml").read_text()))
    agent = next(d for d in docs if d["kind"] == "Deployment")
    injected = inject_manifest(agent, "orders-prod", {"orders-prod": InjectionTarget.for_connection("orders-prod")},
                               settings)
    kubernetes_validate.validate(injected, K8S_VERSIONS[0], strict=True)
    spec = injected["spec"]["template"]["spec"]
    proxy = spec["initContainers"][0]
    assert proxy["name"] == "pgwarden-proxy" and proxy["restartPolicy"] == "Always"
    assert proxy["image"] == "ghcr.io/pgwarden/pgwarden-proxy:1.2.3"
    assert proxy["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}}
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    (container,) = spec["containers"]
    assert {m["name"] for m in container["volumeMounts"]} == {"pgwarden-token"}
    env_names = {e["name"] for e in container["env"]}
    assert {"PGHOST", "PGPORT"} <= env_names and not any("PASSWORD" in n for n in env_names)
    # the agent's own token is for the proxy's audience, not the API server's
    token = next(v for v in spec["volumes"] if v["name"] == "pgwarden-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pgwarden"


def test_the_documented_crd_upgrade_works_with_helm_installed_crds() -> None:
    """Helm owns the CRDs' fields after `helm install`: a server-side apply without
    --force-conflicts stops at a conflict with the field manager `helm`."""
    text = (ROOT / "docs" / "install.md").read_text()
    upgrade = text.split("## Upgrading", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    apply = " ".join(upgrade.replace("\\\n", " ").strip().split("\n")[0].split())
    assert apply.startswith("kubectl apply --server-side --force-conflicts")
    for path in ("crds/", "charts/pgwarden/crds/kopf-peering.yaml"):
        assert f"-f {path}" in apply and (ROOT / path).exists()
    # the chart's CRDs are the same files (symlinks), so what Helm installed is what this applies
    for f in (CHART / "crds").glob("*.yaml"):
        assert f.is_symlink() or f.name == "kopf-peering.yaml"


VAP_API = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"


def test_the_api_server_itself_refuses_an_annotated_pod_without_its_sidecar() -> None:
    """ValidatingAdmissionPolicy (Kubernetes >= 1.30): no operator, webhook setting or outage lets
    a pod that asks for the proxy run without it. Evaluated here with CEL as the API server does."""
    import celpy

    from pgwarden.operator.injection import InjectionTarget, inject_pod
    from pgwarden.operator.settings import InjectionSettings

    assert not of_kind(render(), "ValidatingAdmissionPolicy"), "only where the cluster serves the API"
    proc = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--api-versions", VAP_API)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    policy = one(docs, "ValidatingAdmissionPolicy")
    binding = one(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    for doc in (policy, binding):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)

    env = celpy.Environment()

    def admitted(pod: Manifest) -> bool:
        act = {"object": celpy.json_to_cel(pod)}
        for cond in policy["spec"]["matchConditions"]:
            if not bool(env.program(env.compile(cond["expression"])).evaluate(act)):
                return True  # not matched: the policy does not apply
        return all(bool(env.program(env.compile(v["expression"])).evaluate(act)) for v in policy["spec"]["validations"])

    annotated = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"generateName": "a-", "annotations": {"pgwarden.dev/inject": "orders-prod"}},
                 "spec": {"containers": [{"name": "agent", "image": "a"}]}}
    assert not admitted(annotated)
    forged = copy.deepcopy(annotated)
    forged["metadata"]["annotations"]["pgwarden.dev/injected"] = "orders-prod"  # skips the webhook, not the policy
    assert not admitted(forged)
    for mode in ("native", "container"):
        pod = copy.deepcopy(annotated)
        pod["metadata"]["annotations"]["pgwarden.dev/sidecar-mode"] = mode
        assert admitted(inject_pod(pod, InjectionTarget.for_connection("orders-prod"), InjectionSettings()))
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "p-"},
             "spec": {"containers": [{"name": "x", "image": "x"}]}}
    assert admitted(plain)
