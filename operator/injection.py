"""Sidecar injection: pure functions from a pod (or workload) to its injected form.

The admission webhook (`handlers/admission.py`) and `pgwarden inject` both call these, so the
offline output is exactly what the cluster would run. Nothing here does I/O.

What an injected pod gets:
- the proxy as a native sidecar (an init container with `restartPolicy: Always`, Kubernetes
  >= 1.29; Jobs complete because native sidecars do not block completion), or as a plain
  container with the annotation `pgwarden.dev/sidecar-mode: container` for older clusters
  (a Job's pod then never completes on its own: the proxy keeps running);
- one projected volume, mounted into the proxy only, holding the policy bundle, the ProxyConfig,
  the rotating credentials and a service-account token for the audience `pgwarden`;
- an emptyDir at /var/lib/pgwarden, mounted into the proxy only, for the audit log, and one of its
  own at /var/lib/pgwarden/recordings for the session recordings, each with a sizeLimit, so
  recordings can never fill the audit log's volume (the evidence trail: the agent's containers
  cannot read or rewrite either);
- PGHOST/PGPORT on every agent container (opt out: `pgwarden.dev/inject-env: "false"`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonpatch  # kopf's own dependency, used for its admission patches

from pgwarden.k8s.merge import merge_into
from pgwarden.k8s.names import (
    ANNOTATION_INJECT,
    ANNOTATION_INJECT_ENV,
    ANNOTATION_INJECTED,
    ANNOTATION_MCP,
    ANNOTATION_PROXY_IMAGE,
    ANNOTATION_SIDECAR_MODE,
    LABEL_PROXY_VERSION,
)
from pgwarden.operator.settings import InjectionSettings

# ANNOTATION_MCP ("true" or a port): a second sidecar serves `pgwarden mcp` (streamable HTTP) on the
# pod's loopback, talking to the proxy as the pod's identity
MCP_CONTAINER = "pgwarden-mcp"
MCP_DEFAULT_PORT = 8765
# which proxy an injected pod runs: `kubectl get pods -A -L pgwarden.dev/proxy-version` lists stale
# sidecars after an upgrade (LABEL_PROXY_VERSION holds the image tag, ANNOTATION_PROXY_IMAGE the image)
CARRIED_ANNOTATIONS = (ANNOTATION_INJECT, ANNOTATION_SIDECAR_MODE, ANNOTATION_INJECT_ENV, ANNOTATION_MCP)

PROXY_CONTAINER = "pgwarden-proxy"
CONFIG_VOLUME = "pgwarden-proxy-config"
TMP_VOLUME = "pgwarden-proxy-tmp"
DATA_VOLUME = "pgwarden-proxy-data"
RECORDINGS_VOLUME = "pgwarden-proxy-recordings"
MCP_TMP_VOLUME = "pgwarden-mcp-tmp"
CONFIG_DIR = "/etc/pgwarden"
BUNDLE_DIR = f"{CONFIG_DIR}/bundle"
PROXY_CONFIG_FILE = f"{CONFIG_DIR}/proxy.yaml"
CREDENTIALS_DIR = f"{CONFIG_DIR}/credentials"
TOKEN_FILE = f"{CONFIG_DIR}/token"
OPERATOR_CA_FILE = f"{CONFIG_DIR}/operator-ca.crt"
# writable, proxy only: the audit log and session recordings (the root filesystem is read-only)
DATA_DIR = "/var/lib/pgwarden"
AUDIT_FILE = f"{DATA_DIR}/audit.jsonl"
RECORDINGS_DIR = f"{DATA_DIR}/recordings"
LOCKOUTS_FILE = f"{DATA_DIR}/lockouts.json"  # limits.maxDenials: lifted with kubectl exec … pgwarden lockouts lift
# the share of the recordings volume's sizeLimit the proxy fills (recording.maxTotalBytes): the
# rest is headroom for files being written, so kubelet never evicts the pod for its recordings
RECORDINGS_BUDGET = 0.75
BUNDLE_KEY = "bundle.yaml"
PROXY_CONFIG_KEY = "proxy.yaml"
OPERATOR_CA_KEY = "operator-ca.crt"  # the approvals gateway's CA, in the bundle ConfigMap
# see proxy_volumes: the proxy must read its volume whatever owner kubelet gives the files
PROXY_VOLUME_MODE = 0o444
CREDENTIAL_KEYS = ("username", "password", "version", "host", "port", "database", "sslmode", "sslrootcert")

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob")


class InjectionError(ValueError):
    """The pod cannot be injected safely; the message says what to change."""


@dataclass(frozen=True)
class InjectionTarget:
    """What injection needs to know about the DatabaseConnection named in the annotation."""

    connection: str
    secret_name: str
    bundle_name: str

    @classmethod
    def for_connection(cls, name: str, secret_name: str = "") -> InjectionTarget:
        return cls(connection=name, secret_name=secret_name or f"{name}-pgwarden-credentials",
                   bundle_name=bundle_configmap_name(name))


def bundle_configmap_name(connection: str) -> str:
    return f"{connection}-pgwarden-bundle"


def wants_injection(meta: Mapping[str, Any]) -> str | None:
    """The connection named by the pod's inject annotation, or None."""
    value = (meta.get("annotations") or {}).get(ANNOTATION_INJECT)
    return value.strip() if isinstance(value, str) and value.strip() else None


def is_injected(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> bool:
    if ANNOTATION_INJECTED in (meta.get("annotations") or {}):
        return True
    names = {c.get("name") for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]}
    return PROXY_CONTAINER in names


def proxy_container(target: InjectionTarget, settings: InjectionSettings, *, native: bool) -> dict[str, Any]:
    def field_env(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    probe = {"httpGet": {"path": "/readyz", "port": "pgw-health"}, "periodSeconds": 5, "failureThreshold": 3}
    container: dict[str, Any] = {
        "name": PROXY_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["pgwarden"],
        "args": ["proxy", "--config", BUNDLE_DIR, "--config", PROXY_CONFIG_FILE],
        "ports": [
            {"name": "pgw-postgres", "containerPort": settings.listen_port, "protocol": "TCP"},
            {"name": "pgw-health", "containerPort": settings.health_port, "protocol": "TCP"},
        ],
        "env": [
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            # the proxy's podIdentity: a loopback client is this service account
            field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            field_env("NODE_NAME", "spec.nodeName"),
            {"name": "PGWARDEN_CONNECTION", "value": target.connection},
            *([{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": settings.otel_endpoint}] if settings.otel_endpoint
              else []),
        ],
        "resources": settings.resources.as_k8s(),
        "securityContext": {
            "runAsNonRoot": True,
            # None: the platform assigns the UID (OpenShift's restricted SCC); runAsNonRoot stays
            **({"runAsUser": settings.run_as_user, "runAsGroup": settings.run_as_user}
               if settings.run_as_user is not None else {}),
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "pgw-health"}, "periodSeconds": 1, "failureThreshold": 60},
        "readinessProbe": probe,
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "pgw-health"}, "periodSeconds": 10, "failureThreshold": 3},
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
            {"name": DATA_VOLUME, "mountPath": DATA_DIR},
            {"name": RECORDINGS_VOLUME, "mountPath": RECORDINGS_DIR},
        ],
    }
    if native:
        container["restartPolicy"] = "Always"
    return container


def mcp_port(annotations: Mapping[str, Any]) -> int | None:
    """The port the pgwarden.dev/mcp annotation asks for; None when it is absent or "false"."""
    value = str(annotations.get(ANNOTATION_MCP, "")).strip().lower()
    if value in ("", "false"):
        return None
    if value == "true":
        return MCP_DEFAULT_PORT
    if value.isdigit() and 1024 <= int(value) <= 65535:
        return int(value)
    raise InjectionError(f"annotation {ANNOTATION_MCP}={value!r}: use \"true\" (port {MCP_DEFAULT_PORT}) "
                         "or a port number from 1024 to 65535")


def mcp_container(target: InjectionTarget, settings: InjectionSettings, port: int, *, native: bool) -> dict[str, Any]:
    """`pgwarden mcp --http 127.0.0.1:PORT`: the gate as an MCP server on the pod's loopback. It is a
    client of the proxy beside it, as the pod's identity (podIdentity: no password, no token), so
    it can do nothing the agent could not do over the wire protocol. It mounts nothing of the
    proxy's: no credentials, no configuration."""
    proxy = proxy_container(target, settings, native=native)
    container: dict[str, Any] = {
        "name": MCP_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["pgwarden"],
        "args": ["mcp", "--http", f"127.0.0.1:{port}", "--host", settings.listen_host,
                 "--port", str(settings.listen_port), "--database", target.connection],
        "ports": [{"name": "pgw-mcp", "containerPort": port, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": proxy["securityContext"],
        "volumeMounts": [{"name": MCP_TMP_VOLUME, "mountPath": "/tmp"}],
    }
    if native:
        container["restartPolicy"] = "Always"
    return container


def proxy_volumes(target: InjectionTarget, settings: InjectionSettings) -> list[dict[str, Any]]:
    return [
        {
            "name": CONFIG_VOLUME,
            "projected": {
                # Readable by any UID, because kubelet decides the owner: files belong to root
                # unless every container of the pod runs as one UID, and the pod gets no fsGroup
                # (that would change the agent's volumes too). 0440 root:root locked the proxy
                # (uid 65532) out of its own config. What keeps the credentials from the agent is
                # that only the proxy mounts this volume (see _check_no_leak), not the mode bits.
                "defaultMode": PROXY_VOLUME_MODE,
                "sources": [
                    {"configMap": {"name": target.bundle_name, "items": [
                        {"key": BUNDLE_KEY, "path": f"bundle/{BUNDLE_KEY}"},
                        {"key": PROXY_CONFIG_KEY, "path": PROXY_CONFIG_KEY},
                        {"key": OPERATOR_CA_KEY, "path": OPERATOR_CA_KEY},
                    ]}},
                    {"secret": {"name": target.secret_name, "items": [
                        {"key": k, "path": f"credentials/{k}"} for k in CREDENTIAL_KEYS
                    ]}},
                    {"serviceAccountToken": {"audience": settings.token_audience,
                                             "expirationSeconds": settings.token_expiration_seconds,
                                             "path": "token"}},
                ],
            },
        },
        {"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        # on the node's disk, not memory: it would count against the proxy's memory limit
        {"name": DATA_VOLUME, "emptyDir": {"sizeLimit": settings.data_size_limit}},
        {"name": RECORDINGS_VOLUME, "emptyDir": {"sizeLimit": settings.recordings_size_limit}},
    ]


_QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?")
_QUANTITY_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                   "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(value: str) -> int:
    """A Kubernetes quantity of bytes (`512Mi`, `1G`, `1048576`) as an int; ValueError otherwise."""
    m = _QUANTITY.fullmatch(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a byte quantity such as 512Mi")
    return int(m.group(1)) * _QUANTITY_UNITS[m.group(2)]


def recordings_budget(settings: InjectionSettings) -> int:
    """recording.maxTotalBytes for the sidecar: a share of its recordings volume's sizeLimit."""
    return int(quantity_bytes(settings.recordings_size_limit) * RECORDINGS_BUDGET)


def proxy_version(image: str) -> str:
    """The image's tag (or digest prefix) as a label value: what `kubectl get -L` shows."""
    ref = image.rsplit("/", 1)[-1]
    if "@" in ref:
        value = ref.split("@", 1)[1].replace(":", "-")[:20]
    elif ":" in ref:
        value = ref.rsplit(":", 1)[1]
    else:
        value = "latest"
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:63].strip("-_.")
    return value or "unknown"


def _check_no_leak(spec: Mapping[str, Any], target: InjectionTarget, settings: InjectionSettings,
                   mcp: int | None = None) -> None:
    """Refuse pods whose own containers could read the proxy's credentials or pass for the proxy."""
    for key in ("shareProcessNamespace", "hostPID"):
        if spec.get(key) is True:
            raise InjectionError(f"spec.{key}: true lets the agent's containers reach the proxy's process "
                                 "(/proc/<pid>/root holds the database credentials); remove it")
    if spec.get("hostNetwork") is True:
        raise InjectionError("spec.hostNetwork: true would make the proxy listen on the node's loopback, where every "
                             "process on the node would pass for this pod's service account; remove it")
    taken = {settings.listen_port: "the proxy's PostgreSQL port", settings.health_port: "the proxy's health port"}
    if mcp is not None:
        taken[mcp] = "the port pgwarden.dev/mcp serves MCP on"
    for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        for port in c.get("ports") or []:
            if port.get("containerPort") in taken and (port.get("protocol") or "TCP") == "TCP":
                raise InjectionError(f"container {c.get('name')!r} declares port {port['containerPort']}, "
                                     f"{taken[port['containerPort']]} (the containers of a pod share one network); "
                                     "move it, or run the agent without a local server on that port")
    leaking = {CONFIG_VOLUME, DATA_VOLUME, TMP_VOLUME, RECORDINGS_VOLUME, MCP_TMP_VOLUME}
    for v in spec.get("volumes") or []:
        if v.get("name") in (CONFIG_VOLUME, TMP_VOLUME, DATA_VOLUME, RECORDINGS_VOLUME, MCP_TMP_VOLUME):
            raise InjectionError(f"the pod already defines a volume named {v.get('name')!r}; rename it")
        refs = [(v.get("secret") or {}).get("secretName")]
        refs += [(s.get("secret") or {}).get("name") for s in (v.get("projected") or {}).get("sources") or []]
        if target.secret_name in refs:
            leaking.add(v.get("name"))
        audiences = [(src.get("serviceAccountToken") or {}).get("audience")
                     for src in (v.get("projected") or {}).get("sources") or []]
        if settings.token_audience in audiences:
            # whoever holds a token for this audience is "the proxy" to the approvals gateway
            raise InjectionError(f"volume {v.get('name')!r} projects a token for the audience {settings.token_audience}, "
                                 "which only the pgwarden proxy may hold; use another audience (e.g. pgwarden)")
    for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        for m in c.get("volumeMounts") or []:
            if m.get("name") in leaking:
                raise InjectionError(
                    f"container {c.get('name')!r} mounts the database credentials ({m.get('name')!r}); only the "
                    "pgwarden proxy may hold them: remove that volume mount"
                )
        for src in c.get("envFrom") or []:
            if (src.get("secretRef") or {}).get("name") == target.secret_name:
                raise InjectionError(f"container {c.get('name')!r} reads the credentials Secret through envFrom; remove it")
        for env in c.get("env") or []:
            ref = ((env.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
            if ref == target.secret_name:
                raise InjectionError(f"container {c.get('name')!r} reads the credentials Secret in env "
                                     f"{env.get('name')!r}; remove it")


def check_ephemeral_containers(pod: Mapping[str, Any]) -> None:
    """Refuse ephemeral containers (`kubectl debug`) in an injected pod that would reach the
    proxy's credentials: one targeting the proxy container shares its process namespace
    (/proc/<pid>/root, /proc/<pid>/environ), and a mount of the proxy's volumes or of the
    credentials Secret reads them directly. Other debug containers are left alone."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    if not is_injected(meta, spec):
        return
    volumes = spec.get("volumes") or []
    proxy_volume: Mapping[str, Any] = next((v for v in volumes if v.get("name") == CONFIG_VOLUME), {})
    secrets = {(s.get("secret") or {}).get("name") for s in (proxy_volume.get("projected") or {}).get("sources") or []}
    secrets.discard(None)
    leaking = {CONFIG_VOLUME, TMP_VOLUME, DATA_VOLUME, RECORDINGS_VOLUME}
    for v in volumes:
        refs = {(v.get("secret") or {}).get("secretName")}
        refs |= {(s.get("secret") or {}).get("name") for s in (v.get("projected") or {}).get("sources") or []}
        if refs & secrets:
            leaking.add(v.get("name"))
    for c in spec.get("ephemeralContainers") or []:
        if c.get("targetContainerName") == PROXY_CONTAINER:
            raise InjectionError(f"ephemeral container {c.get('name')!r} targets {PROXY_CONTAINER}, whose process holds "
                                 "the database credentials; debug the agent's container instead "
                                 "(kubectl debug --target=<agent container>)")
        for m in c.get("volumeMounts") or []:
            if m.get("name") in leaking:
                raise InjectionError(f"ephemeral container {c.get('name')!r} mounts {m.get('name')!r}, which holds the "
                                     "pgwarden proxy's credentials; only the proxy may mount it")


def _set_env(container: dict[str, Any], values: Mapping[str, str]) -> None:
    env = [e for e in container.get("env") or [] if e.get("name") not in values]
    env += [{"name": k, "value": v} for k, v in values.items()]
    container["env"] = env


def inject_pod_spec(meta: Mapping[str, Any], spec: Mapping[str, Any], target: InjectionTarget,
                    settings: InjectionSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return injected copies of (metadata, spec); unchanged copies if already injected."""
    new_meta, new_spec = copy.deepcopy(dict(meta)), copy.deepcopy(dict(spec))
    if is_injected(meta, spec):
        return new_meta, new_spec
    _check_no_leak(spec, target, settings, mcp_port(meta.get("annotations") or {}))
    annotations = new_meta.setdefault("annotations", {})
    mode = annotations.get(ANNOTATION_SIDECAR_MODE, "native")
    if mode not in ("native", "container"):
        raise InjectionError(f"annotation {ANNOTATION_SIDECAR_MODE}={mode!r}: use native (Kubernetes >= 1.29) or container")
    native = mode == "native"

    agents = [c.get("name") for c in new_spec.get("containers") or []]
    if str(annotations.get(ANNOTATION_INJECT_ENV, "true")).lower() != "false":
        pg_env = {"PGHOST": settings.listen_host, "PGPORT": str(settings.listen_port)}
        for c in [*(new_spec.get("initContainers") or []), *(new_spec.get("containers") or [])]:
            _set_env(c, pg_env)

    sidecars = [proxy_container(target, settings, native=native)]
    volumes = proxy_volumes(target, settings)
    port = mcp_port(annotations)
    if port is not None:  # after the proxy: native sidecars start in order
        sidecars.append(mcp_container(target, settings, port, native=native))
        volumes.append({"name": MCP_TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}})
    if native:
        new_spec["initContainers"] = [*sidecars, *(new_spec.get("initContainers") or [])]
    else:
        new_spec["containers"] = [*(new_spec.get("containers") or []), *sidecars]
    new_spec["volumes"] = [*(new_spec.get("volumes") or []), *volumes]

    annotations[ANNOTATION_INJECTED] = target.connection
    annotations[ANNOTATION_PROXY_IMAGE] = settings.image
    new_meta.setdefault("labels", {})[LABEL_PROXY_VERSION] = proxy_version(settings.image)
    if agents:
        annotations.setdefault("kubectl.kubernetes.io/default-container", agents[0])
    return new_meta, new_spec


def inject_pod(pod: Mapping[str, Any], target: InjectionTarget, settings: InjectionSettings) -> dict[str, Any]:
    """A Pod object with the proxy injected (a copy; the argument is not modified)."""
    out = copy.deepcopy(dict(pod))
    meta, spec = inject_pod_spec(pod.get("metadata") or {}, pod.get("spec") or {}, target, settings)
    out["metadata"], out["spec"] = meta, spec
    return out


def pod_patch(pod: Mapping[str, Any], target: InjectionTarget, settings: InjectionSettings) -> list[dict[str, Any]]:
    """The JSON patch (RFC 6902) that turns `pod` into its injected form; [] if nothing to do."""
    ops: list[dict[str, Any]] = jsonpatch.JsonPatch.from_diff(dict(pod), inject_pod(pod, target, settings)).patch
    return ops


def pod_template_path(obj: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Where a workload keeps its pod template (None for kinds without one)."""
    kind = obj.get("kind")
    if kind == "CronJob":
        return ("spec", "jobTemplate", "spec", "template")
    if kind in WORKLOAD_KINDS:
        return ("spec", "template")
    return None


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def carry_annotations_patch(workload: Mapping[str, Any]) -> dict[str, Any] | None:
    """Merge patch copying the workload's own pgwarden annotations into its pod template, so
    `kubectl annotate deployment X pgwarden.dev/inject=conn` rolls out injected pods. None when
    the template already carries them."""
    path = pod_template_path(workload)
    if path is None:
        return None
    own = (workload.get("metadata") or {}).get("annotations") or {}
    wanted = {k: own[k] for k in CARRIED_ANNOTATIONS if k in own}
    if not wanted:
        return None
    template_ann = (_dig(workload, (*path, "metadata")) or {}).get("annotations") or {}
    if all(template_ann.get(k) == v for k, v in wanted.items()):
        return None
    patch: dict[str, Any] = {"metadata": {"annotations": wanted}}
    for key in reversed(path):
        patch = {key: patch}
    return patch


def inject_manifest(obj: Mapping[str, Any], connection: str | None, targets: Mapping[str, InjectionTarget],
                    settings: InjectionSettings) -> dict[str, Any]:
    """Offline injection of one manifest (Pod or workload), as the cluster would do it.

    `connection` forces the annotation (as `pgwarden inject --connection`); otherwise the
    object's own annotation decides. Objects of other kinds come back unchanged.
    """
    out = copy.deepcopy(dict(obj))
    kind = out.get("kind")
    if kind == "Pod":
        meta, spec = out.setdefault("metadata", {}), out.get("spec") or {}
    else:
        path = pod_template_path(out)
        if path is None:
            return out
        if connection:
            out.setdefault("metadata", {}).setdefault("annotations", {})[ANNOTATION_INJECT] = connection
        carry = carry_annotations_patch(out)
        if carry is not None:
            merge_into(out, carry)
        template = _dig(out, path)
        if not isinstance(template, dict):
            return out
        meta, spec = template.setdefault("metadata", {}), template.get("spec") or {}
    if connection:
        meta.setdefault("annotations", {})[ANNOTATION_INJECT] = connection
    name = wants_injection(meta)
    if name is None:
        return out
    target = targets.get(name) or InjectionTarget.for_connection(name)
    new_meta, new_spec = inject_pod_spec(meta, spec, target, settings)
    meta.clear()
    meta.update(new_meta)
    holder = out if kind == "Pod" else _dig(out, pod_template_path(out) or ())
    holder["spec"] = new_spec
    return out


