"""Build the approval backend from a ProxyConfig's `approvals:` section.

```yaml
approvals: {backend: local, path: ./pgwarden-data/approvals.db}           # standalone, demo
approvals: {backend: kubernetes, namespace: agents, apiUrl: https://…}      # in a cluster
approvals: {…, notifyUrl: https://hooks.slack.com/…}                        # default notification URL
```
Errors name the field and say what to write instead, like every configuration error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pgwarden.approvals.kubernetes import KubeApi, KubeClient, KubernetesApprovals
from pgwarden.approvals.local import LocalApprovals
from pgwarden.approvals.model import ApprovalBackend
from pgwarden.approvals.notify import Notifier
from pgwarden.resources import ResourceError, parse_duration

BACKENDS = ("local", "kubernetes")
_KEYS = {"backend", "path", "namespace", "apiUrl", "tokenFile", "caFile", "insecureSkipTlsVerify", "notifyUrl",
         "pollInterval"}


def backend_from_config(section: Mapping[str, Any] | None) -> ApprovalBackend:
    """`section` is the raw `approvals:` mapping (None or {} means the local backend at its default path)."""
    s = dict(section or {})
    where = "ProxyConfig spec.approvals"
    for key in s:
        if key not in _KEYS:
            raise ResourceError(where, key, f"unknown field; expected one of {', '.join(sorted(_KEYS))}")
    backend = s.get("backend", "local")
    notify = s.get("notifyUrl") or ""
    if notify and not str(notify).startswith(("http://", "https://")):
        raise ResourceError(where, "notifyUrl", "must be an http:// or https:// URL")
    notifier = Notifier(str(notify))
    if backend == "local":
        poll = parse_duration(s.get("pollInterval", 0.2), field_path="spec.approvals.pollInterval")
        return LocalApprovals(s.get("path"), poll_interval=poll or 0.2, notifier=notifier)
    if backend == "kubernetes":
        try:
            api = KubeApi.from_section(s)
        except ValueError as e:
            raise ResourceError(where, "apiUrl", str(e)) from e
        return KubernetesApprovals(KubeClient(api), api.namespace, notifier=notifier)
    raise ResourceError(where, "backend", f"{backend!r} is not one of {', '.join(BACKENDS)}")
