"""A model of how kubelet writes a projected volume onto the node (ownership, modes, layout).

No kubelet runs on these machines, so the injected pod's volume is checked against this model.
It follows the Kubernetes documentation and kubelet's volume code:

- Projected volumes, "SecurityContext interactions" (kubernetes.io/docs/concepts/storage/
  projected-volumes): files are owned by the pod's *fsUser* — the effective `runAsUser` when every
  init and regular container of the pod runs with the same one (container securityContext over
  pod securityContext; a container without any makes it unknown) — and by root otherwise
  (`FsUserFrom` in pkg/volume/util). Ephemeral containers do not count (they have no say).
- Modes: an item's `mode`, else the volume's `defaultMode`, else 0644. A `serviceAccountToken`
  source is the exception: 0600 whenever the pod has an fsUser or an fsGroup, `defaultMode`
  otherwise (pkg/volume/projected).
- fsGroup (pod securityContext): after writing, kubelet gives every file the group fsGroup and
  adds read for it (0440: projected volumes are read-only); without fsGroup the group stays root.
- Layout (AtomicWriter, pkg/volume/util/atomic_writer.go): the payload goes into a timestamped
  folder `..2026_11_29_21_00_00.123` (chmod 0755) with sub-folders 0755, `..data` is a symlink to
  it, and each top-level path is a symlink through `..data`. The volume root is a tmpfs whose
  mode is 0777 (the emptyDir wrapper).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODE = 0o644
TOKEN_OWNED_MODE = 0o600
FSGROUP_READ_MASK = 0o440


@dataclass(frozen=True)
class ProjectedFile:
    path: str  # relative to the volume root
    data: bytes
    mode: int
    uid: int
    gid: int


def effective_run_as_user(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> int | None:
    own = (container.get("securityContext") or {}).get("runAsUser")
    if own is not None:
        return int(own)
    pod = (pod_spec.get("securityContext") or {}).get("runAsUser")
    return int(pod) if pod is not None else None


def fs_user(pod_spec: Mapping[str, Any]) -> int | None:
    """kubelet's FsUserFrom: the one UID all init and regular containers run as, else None."""
    found: int | None = None
    for c in [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]:
        uid = effective_run_as_user(pod_spec, c)
        if uid is None or (found is not None and uid != found):
            return None
        found = uid
    return found


def fs_group(pod_spec: Mapping[str, Any]) -> int | None:
    g = (pod_spec.get("securityContext") or {}).get("fsGroup")
    return int(g) if g is not None else None


def projected_files(
    pod_spec: Mapping[str, Any],
    volume_name: str,
    configmaps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, str]],
    token: str,
) -> list[ProjectedFile]:
    """The files kubelet writes for one projected volume. `secrets` hold base64 data as in the
    API object; `configmaps` plain data. A missing key fails as kubelet fails the mount."""
    (volume,) = [v for v in pod_spec.get("volumes") or [] if v.get("name") == volume_name]
    projected = volume["projected"]
    default = projected.get("defaultMode", DEFAULT_MODE)
    user, group = fs_user(pod_spec), fs_group(pod_spec)
    uid = user if user is not None else 0
    out: list[tuple[str, bytes, int]] = []
    for source in projected["sources"]:
        if "configMap" in source or "secret" in source:
            ref = source.get("configMap") or source["secret"]
            store = configmaps if "configMap" in source else secrets
            data = store[ref["name"]]
            items = ref.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                if item["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise KeyError(
                        f"kubelet cannot mount the volume: key {item['key']} is missing from {ref['name']}"
                    )
                raw = data[item["key"]]
                content = base64.b64decode(raw) if "secret" in source else raw.encode()
                out.append((item["path"], content, item.get("mode", default)))
        elif "serviceAccountToken" in source:
            mode = TOKEN_OWNED_MODE if (user is not None or group is not None) else default
            out.append((source["serviceAccountToken"]["path"], token.encode(), mode))
    files = []
    for path, content, mode in out:
        gid = 0
        if group is not None:
            gid, mode = group, mode | FSGROUP_READ_MASK
        files.append(ProjectedFile(path, content, mode, uid, gid))
    return files


def write_volume(
    root: Path, files: list[ProjectedFile], stamp: str = "..2026_11_29_21_00_00.000000001"
) -> None:
    """Lay the files out as kubelet's AtomicWriter does (run as root: it chowns)."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o777)
    ts = root / stamp
    ts.mkdir()
    os.chmod(ts, 0o755)
    for f in files:
        target = ts / f.path
        for parent in reversed(target.relative_to(ts).parents[:-1]):
            d = ts / parent
            if not d.exists():
                d.mkdir()
                os.chmod(d, 0o755)
        target.write_bytes(f.data)
        os.chmod(target, f.mode)
        os.chown(target, f.uid, f.gid)
    (root / "..data").symlink_to(stamp)
    for top in sorted({f.path.split("/", 1)[0] for f in files}):
        (root / top).symlink_to(f"..data/{top}")
