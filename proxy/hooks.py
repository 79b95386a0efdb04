"""Per-session gate and observer: where policy, masking, audit and recording plug into the relay.

Until AccessPolicy documents name the connection, `ProxyConfig.spec.defaultAction` decides:
`allow` forwards everything (development), `deny` (the default) refuses every statement.
"""

from __future__ import annotations

from pgwarden.proxy import messages as m
from pgwarden.proxy.auth import TokenAuthenticator
from pgwarden.proxy.config import ProxyConfig
from pgwarden.proxy.relay import Gate, Observer, Verdict
from pgwarden.proxy.server import SessionHooks, SessionInfo

from pgwarden.errors import PolicyDenied
from pgwarden.resources import Document


class DenyAll:
    """No policy covers this connection: nothing runs."""

    def __init__(self, connection: str) -> None:
        self._verdict = Verdict(
            error=PolicyDenied(
                f"no AccessPolicy covers connection {connection!r}, so every statement is denied",
                hint="Ask your platform team for an AccessPolicy that names you as a subject.",
            )
        )

    def query(self, sql: str) -> Verdict | None:
        return self._verdict

    def parse(self, name: str, sql: str) -> Verdict | None:
        return self._verdict

    def bind(self, bind: m.BindMsg) -> Verdict | None:
        return None


def build_hooks(config: ProxyConfig, docs: list[Document]) -> tuple[SessionHooks | None, TokenAuthenticator | None]:
    connection = config.connection.name
    has_policy = any(
        d.kind == "AccessPolicy" and (d.spec.get("connectionRef") or {}).get("name") == connection for d in docs
    )
    if not has_policy:
        if config.default_action == "allow":
            return None, None
        deny = DenyAll(connection)

        def deny_hooks(info: SessionInfo) -> tuple[Gate | None, Observer | None]:
            return deny, None

        return deny_hooks, None
    raise NotImplementedError("AccessPolicy enforcement is wired in with the policy engine")
