"""The proxy's own workload, from the downward API environment the injected sidecar gets.

The operator's injection sets POD_NAMESPACE, POD_NAME, POD_SERVICE_ACCOUNT and NODE_NAME
(`fieldRef`s); standalone, they are absent and the workload is empty.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pgwarden.subjects import Workload

ENV_NAMES = {
    "namespace": ("PGWARDEN_POD_NAMESPACE", "POD_NAMESPACE"),
    "pod": ("PGWARDEN_POD_NAME", "POD_NAME"),
    "service_account": ("PGWARDEN_POD_SERVICE_ACCOUNT", "POD_SERVICE_ACCOUNT", "SERVICE_ACCOUNT"),
    "node": ("PGWARDEN_NODE_NAME", "NODE_NAME"),
}


def workload_from_env(env: Mapping[str, str] | None = None) -> Workload:
    env = os.environ if env is None else env
    values = {}
    for field_name, names in ENV_NAMES.items():
        values[field_name] = next((env[n] for n in names if env.get(n)), "")
    return Workload(**values)
