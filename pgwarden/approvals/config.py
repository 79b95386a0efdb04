"""Build the approval backend from a ProxyConfig's `approvals:` section.

```yaml
approvals: {backend: local, path: ./pgwarden-data/approvals.db}           # standalone, development
approvals: {backend: local, path: …, reviewerGroup: dba}                   # reviewers in group dba decide
approvals: {backend: local, …, allowProxyUserDecisions: true}              # no agent runs as the proxy's user (demo)
approvals: {backend: kubernetes, namespace: agents, apiUrl: https://…}      # in a cluster
approvals: {…, notifyUrl: https://hooks.slack.com/…}                        # default notification URL
```
Errors name the field and say what to write instead, like every configuration error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pgwarden.approvals.kubernetes import KubeApi, KubeClient, KubernetesApprovals
from pgwarden.approvals.local import DEV_WARNING, LocalApprovals
from pgwarden.approvals.model import ApprovalBackend
from pgwarden.approvals.notify import Notifier
from pgwarden.resources import ResourceError, parse_duration

log = logging.getLogger("pgwarden.approvals")

BACKENDS = ("local", "kubernetes")
_KEYS = {"backend", "path", "namespace", "apiUrl", "tokenFile", "caFile", "insecureSkipTlsVerify", "notifyUrl",
         "pollInterval", "reviewerGroup", "allowProxyUserDecisions"}
_LOCAL_ONLY = ("reviewerGroup", "allowProxyUserDecisions")


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
        group = s.get("reviewerGroup")
        if group is not None and not isinstance(group, (str, int)):
            raise ResourceError(where, "reviewerGroup", "must be a group name or a numeric group id")
        may = s.get("allowProxyUserDecisions", False)
        if not isinstance(may, bool):
            raise ResourceError(where, "allowProxyUserDecisions", "must be true or false")
        try:
            queue = LocalApprovals(s.get("path"), poll_interval=poll or 0.2, notifier=notifier,
                                   reviewer_group=group, proxy_user_may_decide=may)
        except ValueError as e:
            raise ResourceError(where, "reviewerGroup" if group is not None else "path", str(e)) from e
        except OSError as e:
            raise ResourceError(where, "path", f"cannot prepare the approvals database {s.get('path') or ''}: "
                                f"{e.strerror} ({e.filename}); the proxy's OS user must own the file and be able "
                                "to write its folder (give the queue a folder of its own)") from e
        log.warning("%s (approvals database %s, mode %o%s)", DEV_WARNING, queue.path, queue.file_mode,
                    "; decisions by the proxy's own OS user are allowed" if may else "")
        return queue
    for key in _LOCAL_ONLY:
        if key in s:
            raise ResourceError(where, key, "applies to the local backend only; remove it")
    if backend == "kubernetes":
        try:
            api = KubeApi.from_section(s)
        except ValueError as e:
            raise ResourceError(where, "apiUrl", str(e)) from e
        return KubernetesApprovals(KubeClient(api), api.namespace, notifier=notifier)
    raise ResourceError(where, "backend", f"{backend!r} is not one of {', '.join(BACKENDS)}")
