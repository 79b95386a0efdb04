"""The proxy's own workload, from the downward API environment the injected sidecar gets.

The operator's injection sets POD_NAMESPACE, POD_NAME, POD_SERVICE_ACCOUNT and NODE_NAME
(`fieldRef`s); standalone, they are absent and the workload is empty.
"""

from __future__ import annotations

import ipaddress
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


def is_loopback(peer: str) -> bool:
    """Is the client on this host (in a sidecar: a container of this pod)? `peer` is "HOST:PORT"
    or "unix". Decided on the parsed address, never on its spelling: a prefix test let
    `::10.0.0.1` (an IPv4-compatible address of another host) pass for `::1`."""
    if peer == "unix":
        return True
    host = peer.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback  # ::ffff:127.0.0.1 is 127.0.0.1
    return addr.is_loopback
