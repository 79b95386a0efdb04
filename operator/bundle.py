"""The policy bundle of one DatabaseConnection: a pure compiler from custom resources to the
ConfigMap the sidecars mount (`bundle.yaml` + `proxy.yaml`).

Fail-closed rules:
- every AccessPolicy and MaskingRule naming the connection is validated with the same code
  `pgwarden proxy` runs (`pgwarden.policy.load_policies`, `pgwarden.masking.load_masking`);
- if any of them is invalid, no bundle is produced and the caller keeps the last good one —
  dropping only the bad object could drop a deny rule or a mask, which would fall open;
- unknown tables and columns (from the live catalog) are warnings, not errors: a policy may be
  written before the migration that creates its table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from pgwarden.connection import DatabaseConnection
from pgwarden.k8s.names import ANNOTATION_BUNDLE_DIGEST, API_VERSION
from pgwarden.operator.credentials import managed_labels, owner_reference
from pgwarden.operator.injection import (
    AUDIT_FILE,
    BUNDLE_KEY,
    CREDENTIALS_DIR,
    LOCKOUTS_FILE,
    OPERATOR_CA_FILE,
    OPERATOR_CA_KEY,
    PROXY_CONFIG_KEY,
    RECORDINGS_DIR,
    TOKEN_FILE,
    bundle_configmap_name,
    recordings_budget,
)
from pgwarden.operator.settings import InjectionSettings
from pgwarden.operator.status import BundleReason
from pgwarden.resources import Document, ResourceError, document_from_object

DIGEST_KEY = "digest"


@dataclass
class ObjectReport:
    """What the compiler says about one AccessPolicy or MaskingRule (goes into its status)."""

    kind: str
    name: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.errors


@dataclass
class BundleResult:
    data: dict[str, str] | None  # ConfigMap data; None: keep the last good bundle
    digest: str | None
    reports: dict[tuple[str, str], ObjectReport]
    problem: str = ""  # why no bundle was produced (or published)
    reason: BundleReason = "InvalidObjects"  # the BundleReady condition's reason when there is a problem
    published: bool = True  # False: valid, but not written (the ConfigMap is not ours)


def connection_of(raw: Mapping[str, Any]) -> str | None:
    """The DatabaseConnection an AccessPolicy/MaskingRule names (spec.connectionRef.name)."""
    ref = (raw.get("spec") or {}).get("connectionRef") or {}
    name = ref.get("name") if isinstance(ref, Mapping) else None
    return name if isinstance(name, str) and name else None


def clean_object(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Only what the proxy reads: no status, managedFields, kopf annotations or uids."""
    meta = raw.get("metadata") or {}
    out_meta: dict[str, Any] = {"name": meta.get("name"), "namespace": meta.get("namespace") or "default"}
    if meta.get("labels"):
        out_meta["labels"] = dict(meta["labels"])
    if meta.get("generation") is not None:
        out_meta["generation"] = meta["generation"]
    return {"apiVersion": raw.get("apiVersion", API_VERSION), "kind": raw.get("kind"), "metadata": out_meta,
            "spec": dict(raw.get("spec") or {})}


def bundle_connection_object(raw: Mapping[str, Any], has_ca: bool) -> dict[str, Any]:
    """The DatabaseConnection as the sidecar sees it: no admin Secret reference, and the CA
    path pointing into the mounted credentials when the admin Secret carries one."""
    obj = clean_object(raw)
    spec = obj["spec"]
    spec.pop("adminSecretRef", None)
    if has_ca:
        spec["sslRootCert"] = f"{CREDENTIALS_DIR}/sslrootcert"
    else:
        spec.pop("sslRootCert", None)
    return obj


def proxy_config_object(conn: DatabaseConnection, settings: InjectionSettings) -> dict[str, Any]:
    """The ProxyConfig every sidecar of this connection runs with.

    - `podIdentity`: a client on the pod's loopback is the pod's service account (downward API
      env POD_NAMESPACE / SERVICE_ACCOUNT), with no password; no static users in a cluster.
    - `audit`: the hash-chained file on the proxy-only emptyDir (the root filesystem is read-only),
      also on stdout for the cluster's log shipper; OTLP when the chart enables it.
    - `recording`: session recordings on their own volume, capped below its sizeLimit; `lockouts`:
      limits.maxDenials lockouts, on the audit log's volume.
    - `approvals`: ApprovalRequest objects in the connection's namespace (= the pod's: injection
      only uses a DatabaseConnection of the pod's own namespace), through the operator's approvals
      gateway with the proxy's own projected token (`approvals_url`; the agent's service account
      needs no right on pgwarden.dev resources, and the pod needs no automounted token); without
      `approvals_url`, straight to the API server with the pod's service account.
    """
    approvals: dict[str, Any] = {"backend": "kubernetes", "namespace": conn.namespace}
    if settings.approvals_url:
        approvals.update(apiUrl=settings.approvals_url, tokenFile=TOKEN_FILE, caFile=OPERATOR_CA_FILE)
    return {
        "apiVersion": API_VERSION,
        "kind": "ProxyConfig",
        "metadata": {"name": conn.name, "namespace": conn.namespace},
        "spec": {
            "connectionRef": {"name": conn.name},
            "listen": {"host": settings.listen_host, "port": settings.listen_port},
            # kubelet probes the pod IP, not loopback
            "health": {"host": "0.0.0.0", "port": settings.health_port},
            "upstream": {"credentialsDir": CREDENTIALS_DIR},
            "podIdentity": True,
            "users": [],
            "audit": {
                "path": AUDIT_FILE,
                "rotateBytes": settings.audit_rotate_bytes,
                "keep": settings.audit_keep,
                "stdout": settings.audit_stdout,
                "otel": settings.audit_otel,
            },
            # private files on their own size-limited volume, bounded per session and in total
            "recording": {
                "dir": RECORDINGS_DIR,
                "maxBytesPerSession": settings.recording_max_bytes_per_session,
                "maxTotalBytes": recordings_budget(settings),
            },
            "lockouts": {"path": LOCKOUTS_FILE},
            "approvals": approvals,
        },
    }


Validator = Callable[[Sequence[Document]], object]


def _policy_loader() -> Validator | None:
    try:
        from pgwarden.policy import load_policies
    except ImportError:
        return None
    return load_policies


def _masking_loader() -> Validator | None:
    try:
        from pgwarden.masking import load_masking
    except ImportError:
        return None
    return load_masking


def default_validators() -> dict[str, Validator | None]:
    """The loaders the proxy itself runs (policy, masking), imported lazily: the operator never
    imports the proxy, and pays for pglast only when it compiles a bundle."""
    return {"AccessPolicy": _policy_loader(), "MaskingRule": _masking_loader()}


def _tables_of(raw: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """(field path, schema.table, column or None) referenced by a policy or masking rule."""
    spec = raw.get("spec") or {}
    out: list[tuple[str, str, str | None]] = []
    if raw.get("kind") == "AccessPolicy":
        for i, rule in enumerate(spec.get("rules") or []):
            if not isinstance(rule, Mapping):
                continue
            for j, t in enumerate(rule.get("tables") or []):
                if isinstance(t, str) and "*" not in t:
                    out.append((f"spec.rules[{i}].tables[{j}]", t if "." in t else f"public.{t}", None))
    elif raw.get("kind") == "MaskingRule":
        for i, c in enumerate(spec.get("columns") or []):
            if isinstance(c, Mapping) and isinstance(c.get("table"), str):
                t = c["table"]
                out.append((f"spec.columns[{i}]", t if "." in t else f"public.{t}", c.get("column")))
    return out


def catalog_warnings(raw: Mapping[str, Any], catalog: Mapping[str, set[str]]) -> list[str]:
    warnings = []
    for path, table, column in _tables_of(raw):
        key = table.lower()
        if key not in catalog:
            warnings.append(f"{path}: table {table} does not exist in the database (yet?)")
        elif column is not None and str(column).lower() not in catalog[key]:
            warnings.append(f"{path}: column {column} does not exist in {table}")
    return warnings


def compile_bundle(
    connection_raw: Mapping[str, Any],
    objects: Iterable[Mapping[str, Any]],
    conn: DatabaseConnection,
    settings: InjectionSettings,
    *,
    has_ca: bool = False,
    catalog: Mapping[str, set[str]] | None = None,
    validators: Mapping[str, Validator | None] | None = None,
    operator_ca: str = "",
) -> BundleResult:
    """Validate every AccessPolicy/MaskingRule of `conn` and build the ConfigMap data."""
    validators = default_validators() if validators is None else validators
    conn_obj = bundle_connection_object(connection_raw, has_ca)
    reports: dict[tuple[str, str], ObjectReport] = {}
    mine: list[dict[str, Any]] = []
    for raw in sorted(objects, key=lambda o: (str(o.get("kind")), str((o.get("metadata") or {}).get("name")))):
        if raw.get("kind") not in ("AccessPolicy", "MaskingRule") or connection_of(raw) != conn.name:
            continue
        obj = clean_object(raw)
        if obj["metadata"]["namespace"] != conn.namespace:
            continue
        report = ObjectReport(kind=obj["kind"], name=obj["metadata"]["name"])
        reports[(report.kind, report.name)] = report
        mine.append(obj)
        try:
            doc = document_from_object(obj, source=f"{report.kind}/{report.name}")
            check = validators.get(report.kind)
            if check is not None:
                check([document_from_object(conn_obj, source="DatabaseConnection"), doc])
        except ResourceError as e:
            report.errors.append(e.problem if e.field_path == "" else f"{e.field_path}: {e.problem}")
        except Exception as e:  # a validator bug must not publish an unchecked bundle
            report.errors.append(f"validation failed unexpectedly: {type(e).__name__}: {e}")
        if catalog is not None:
            report.warnings += catalog_warnings(obj, catalog)

    bad = [r for r in reports.values() if r.errors]
    if bad:
        names = ", ".join(f"{r.kind}/{r.name}" for r in bad)
        return BundleResult(None, None, reports, problem=f"invalid: {names}; the last good bundle stays in place")

    # all together too: the loaders may check across documents (e.g. duplicate names)
    docs = [document_from_object(o, source="bundle", index=i) for i, o in enumerate([conn_obj, *mine])]
    for kind, check in validators.items():
        if check is None:
            continue
        try:
            check(docs)
        except ResourceError as e:
            culprit = reports.get((kind, e.where.split(" ")[-1].rstrip(")").split("/")[-1]))
            msg = str(e)
            for r in ([culprit] if culprit else [r for r in reports.values() if r.kind == kind]):
                r.errors.append(msg)
            return BundleResult(None, None, reports, problem=f"the {kind} set is invalid: {msg}")

    bundle_text = yaml.safe_dump_all([conn_obj, *mine], sort_keys=True)
    proxy_text = yaml.safe_dump(proxy_config_object(conn, settings), sort_keys=True)
    digest = hashlib.sha256((bundle_text + "\0" + proxy_text + "\0" + operator_ca).encode()).hexdigest()[:16]
    # the CA key is always there (the sidecar's volume lists it by name), empty without a gateway
    data = {BUNDLE_KEY: bundle_text, PROXY_CONFIG_KEY: proxy_text, OPERATOR_CA_KEY: operator_ca, DIGEST_KEY: digest}
    return BundleResult(data, digest, reports)


def configmap_drift(existing: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that makes the bundle ConfigMap exactly `desired` (data, labels, digest
    annotation, owner), also undoing hand edits that left the digest alone; None when it already is."""
    if existing is None:
        return None
    have_data = dict(existing.get("data") or {})
    want_data = dict(desired.get("data") or {})
    meta, want_meta = existing.get("metadata") or {}, desired.get("metadata") or {}
    patch: dict[str, Any] = {}
    if have_data != want_data or existing.get("binaryData"):
        patch["data"] = {**{k: None for k in have_data if k not in want_data}, **want_data}
        if existing.get("binaryData"):
            patch["binaryData"] = None
    meta_patch: dict[str, Any] = {}
    for key in ("labels", "annotations"):
        have, want = meta.get(key) or {}, want_meta.get(key) or {}
        if any(have.get(k) != v for k, v in want.items()):
            meta_patch[key] = want
    if want_meta.get("ownerReferences") and meta.get("ownerReferences") != want_meta["ownerReferences"]:
        meta_patch["ownerReferences"] = want_meta["ownerReferences"]
    if meta_patch:
        patch["metadata"] = meta_patch
    return patch or None


def bundle_configmap(conn: DatabaseConnection, result: BundleResult, owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    if result.data is None:
        raise ValueError("no bundle to publish: " + result.problem)
    meta: dict[str, Any] = {
        "name": bundle_configmap_name(conn.name),
        "namespace": conn.namespace,
        "labels": managed_labels(conn.name),
        "annotations": {ANNOTATION_BUNDLE_DIGEST: result.digest or ""},
    }
    refs = owner_reference(owner)
    if refs:
        meta["ownerReferences"] = refs
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": dict(result.data)}
