"""The operator's settings: one documented dataclass, built once at startup and passed explicitly.

Nothing in `pgwarden.operator` reads the environment at import time. `OperatorSettings.from_env`
is called by `pgwarden operator` (and by tests, which build the dataclass directly instead).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from pgwarden.k8s.names import WEBHOOK_CONFIGURATION
from pgwarden.resources import parse_duration

DEFAULT_PROXY_IMAGE = "ghcr.io/pgwarden/pgwarden-proxy:0.1.0"


def _flag(value: str | None, default: bool) -> bool:
    """"true"/"false" as Helm renders booleans (also 1/0, yes/no); unset or empty: the default."""
    if value is None or not value.strip():
        return default
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean; write true or false")


def _uid(value: str | None, default: int | None) -> int | None:
    """A UID as the chart renders it; "" or "null" (Helm's empty value): let the platform assign one."""
    if value is None:
        return default
    v = value.strip()
    if v in ("", "null", "none", "auto"):
        return None
    uid = int(v)
    if uid <= 0:
        raise ValueError(f"PGWARDEN_SIDECAR_RUN_AS_USER={value!r}: the proxy never runs as root; use a UID > 0 or leave it empty")
    return uid


@dataclass(frozen=True)
class SidecarResources:
    """Requests and limits of the injected proxy container (Kubernetes quantity strings)."""

    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"

    def as_k8s(self) -> dict[str, dict[str, str]]:
        return {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {"cpu": self.cpu_limit, "memory": self.memory_limit},
        }


@dataclass(frozen=True)
class InjectionSettings:
    """How the proxy sidecar looks in every injected pod."""

    image: str = DEFAULT_PROXY_IMAGE
    image_pull_policy: str = "IfNotPresent"
    resources: SidecarResources = field(default_factory=SidecarResources)
    # the proxy listens here inside the pod; agents get PGHOST/PGPORT pointing at it
    listen_host: str = "127.0.0.1"
    listen_port: int = 5432
    health_port: int = 8081
    # audience of the proxy's own projected token, which it presents to the operator's approvals
    # gateway. Not `pgwarden`: agents hold tokens for that audience to log in to the proxy, and an
    # agent must never pass for its proxy (injection refuses agent volumes with this audience)
    token_audience: str = "pgwarden-operator"
    token_expiration_seconds: int = 3600
    # the UID (and GID) the proxy runs as; None leaves it to the platform (OpenShift's restricted
    # SCC assigns one per namespace) — runAsNonRoot is always set
    run_as_user: int | None = 65532
    # the sidecar's audit log: a hash-chained file on an emptyDir (the root filesystem is
    # read-only), also printed to stdout for the cluster's log shipper, optionally OTLP
    audit_stdout: bool = True
    audit_otel: bool = False
    audit_rotate_bytes: str = "64Mi"
    audit_keep: int = 3
    # OTEL_EXPORTER_OTLP_ENDPOINT of the proxy container; "" leaves it unset
    otel_endpoint: str = ""
    # the emptyDir holding the audit log (kubelet evicts the pod beyond this size)
    data_size_limit: str = "1Gi"
    # the session recordings' own emptyDir, so recordings can never fill the audit log's volume
    # (every statement would then fail with PW004); the proxy keeps the recordings under
    # RECORDINGS_BUDGET of it, removing the oldest first, so kubelet never evicts the pod for them
    recordings_size_limit: str = "512Mi"
    recording_max_bytes_per_session: str = "16Mi"
    # the approvals gateway the sidecars call (https://<service>.<namespace>.svc:9444); empty: the
    # sidecar calls the API server with the pod's service account (which the agent shares)
    approvals_url: str = ""


@dataclass(frozen=True)
class WebhookSettings:
    """kopf's admission webhook server.

    Without `certfile`/`pkeyfile` the operator generates a self-signed certificate at startup
    (fine for one replica and for tests). With two replicas, mount one certificate into both
    (cert-manager or the chart's Secret) so both present the same CA to the API server.
    """

    enabled: bool = True
    addr: str = "0.0.0.0"
    port: int = 9443
    # the name the API server uses to reach the operator, e.g. pgwarden-webhook.pgwarden.svc
    host: str | None = None
    certfile: str | None = None
    pkeyfile: str | None = None
    cafile: str | None = None
    # write the CA bundle here (e.g. for curl --cacert, or for tests)
    cadump: str | None = None
    # name of the Mutating/ValidatingWebhookConfiguration kopf keeps up to date; None: unmanaged
    managed: str | None = WEBHOOK_CONFIGURATION


@dataclass(frozen=True)
class GatewaySettings:
    """The approvals gateway: HTTPS on which proxy sidecars file and watch ApprovalRequests.

    Its certificate defaults to the webhook's (`WebhookSettings.certfile`/`pkeyfile`); without
    any, a self-signed one is made at startup. `cafile` is what the sidecars trust (put into each
    bundle); a self-signed certificate is its own CA."""

    # off unless asked for (the chart does, PGWARDEN_GATEWAY=true): tests run operators side by side
    enabled: bool = False
    addr: str = "0.0.0.0"
    port: int = 9444
    certfile: str | None = None
    pkeyfile: str | None = None
    cafile: str | None = None
    # positive TokenReviews are reused this long (one API call per proxy token, not per request)
    review_cache_seconds: float = 30.0
    # how often the mounted certificate is checked for a renewal
    reload_interval: float = 30.0


@dataclass(frozen=True)
class RotationSettings:
    """Lower bounds for credential rotation.

    The CRD and `parse_connection` insist on rotationInterval >= 1m so that kubelet can
    propagate a Secret before the next rotation. Tests that want to see several rotations in
    seconds lower `min_interval` here instead of weakening the public validation: the spec
    keeps its units, and the operator scales them by `time_scale` (1.0 in production).
    """

    # multiply every rotationInterval / gracePeriod by this (tests: e.g. 0.05 turns 1m into 3s)
    time_scale: float = 1.0
    # how long a DB error waits before kopf retries (TemporaryError delay)
    retry_delay: float = 30.0
    # how often the timer looks at every DatabaseConnection even when nothing is due
    check_interval: float = 30.0


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the operator needs to know that is not in a custom resource."""

    injection: InjectionSettings = field(default_factory=InjectionSettings)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    rotation: RotationSettings = field(default_factory=RotationSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    # kopf peering object name; None runs standalone (one replica, tests)
    peering_name: str | None = "pgwarden"
    # this replica's kopf peering priority (the highest live one is active); None: random per
    # process, since kopf pauses all replicas that share a priority
    peering_priority: int | None = None
    # namespaces to watch; empty: cluster-wide
    namespaces: tuple[str, ...] = ()
    # PostgreSQL connect timeout for the admin connection, seconds
    connect_timeout: float = 10.0
    # how long an admission answer may reuse a DatabaseConnection / AccessPolicy read from the
    # API (a standby replica has no watch streams; see Runtime.connection_secret)
    lookup_cache_seconds: float = 5.0
    # the operator's own Kubernetes username (system:serviceaccount:NS:NAME): the approvals
    # gateway files requests in proxies' names with it, which the webhook then accepts
    operator_username: str = ""
    # carry the inject annotation of annotated workloads into their pod templates (watch + patch
    # on Deployments, StatefulSets, DaemonSets, Jobs, CronJobs)
    carry_annotations: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """Read PGWARDEN_* variables (the chart sets them); unknown ones are ignored."""
        e = os.environ if env is None else env
        s = cls()
        inj = s.injection
        inj = replace(
            inj,
            audit_stdout=_flag(e.get("PGWARDEN_SIDECAR_AUDIT_STDOUT"), inj.audit_stdout),
            audit_otel=_flag(e.get("PGWARDEN_SIDECAR_AUDIT_OTEL"), inj.audit_otel),
            otel_endpoint=e.get("PGWARDEN_SIDECAR_OTEL_ENDPOINT", inj.otel_endpoint).strip(),
            approvals_url=e.get("PGWARDEN_APPROVALS_URL", inj.approvals_url).strip(),
            run_as_user=_uid(e.get("PGWARDEN_SIDECAR_RUN_AS_USER"), inj.run_as_user),
            image=e.get("PGWARDEN_PROXY_IMAGE", inj.image),
            image_pull_policy=e.get("PGWARDEN_PROXY_IMAGE_PULL_POLICY", inj.image_pull_policy),
            resources=SidecarResources(
                cpu_request=e.get("PGWARDEN_SIDECAR_CPU_REQUEST", inj.resources.cpu_request),
                memory_request=e.get("PGWARDEN_SIDECAR_MEMORY_REQUEST", inj.resources.memory_request),
                cpu_limit=e.get("PGWARDEN_SIDECAR_CPU_LIMIT", inj.resources.cpu_limit),
                memory_limit=e.get("PGWARDEN_SIDECAR_MEMORY_LIMIT", inj.resources.memory_limit),
            ),
        )
        wh = s.webhook
        wh = replace(
            wh,
            enabled=e.get("PGWARDEN_WEBHOOK", "true").lower() not in ("0", "false", "no"),
            addr=e.get("PGWARDEN_WEBHOOK_ADDR", wh.addr),
            port=int(e.get("PGWARDEN_WEBHOOK_PORT", wh.port)),
            host=e.get("PGWARDEN_WEBHOOK_HOST") or wh.host,
            certfile=e.get("PGWARDEN_WEBHOOK_CERTFILE") or None,
            pkeyfile=e.get("PGWARDEN_WEBHOOK_PKEYFILE") or None,
            cafile=e.get("PGWARDEN_WEBHOOK_CAFILE") or None,
            managed=e.get("PGWARDEN_WEBHOOK_MANAGED", wh.managed or "") or None,
        )
        if e.get("PGWARDEN_OPERATOR_USERNAME"):
            s = replace(s, operator_username=e["PGWARDEN_OPERATOR_USERNAME"].strip())
        if e.get("PGWARDEN_PEERING_NAME"):
            s = replace(s, peering_name=e["PGWARDEN_PEERING_NAME"].strip())
        s = replace(s, carry_annotations=_flag(e.get("PGWARDEN_CARRY_ANNOTATIONS"), s.carry_annotations))
        if e.get("PGWARDEN_PEERING_PRIORITY"):
            s = replace(s, peering_priority=int(e["PGWARDEN_PEERING_PRIORITY"]))
        gw = s.gateway
        gw = replace(
            gw,
            enabled=_flag(e.get("PGWARDEN_GATEWAY"), gw.enabled),
            addr=e.get("PGWARDEN_GATEWAY_ADDR", gw.addr),
            port=int(e.get("PGWARDEN_GATEWAY_PORT", gw.port)),
            certfile=e.get("PGWARDEN_GATEWAY_CERTFILE") or wh.certfile,
            pkeyfile=e.get("PGWARDEN_GATEWAY_PKEYFILE") or wh.pkeyfile,
            cafile=e.get("PGWARDEN_GATEWAY_CAFILE") or wh.cafile,
        )
        rot = s.rotation
        if "PGWARDEN_ROTATION_CHECK_INTERVAL" in e:
            rot = replace(rot, check_interval=parse_duration(e["PGWARDEN_ROTATION_CHECK_INTERVAL"]))
        return replace(s, injection=inj, webhook=wh, rotation=rot, gateway=gw)
