"""What the gate and the observers know about one client session, and the hook that builds them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pgwarden.audit import records
from pgwarden.proxy.relay import Gate, Observer
from pgwarden.subjects import Identity


@dataclass
class SessionInfo:
    """What the gate and observers know about a session."""

    id: str
    identity: Identity
    peer: str
    application_name: str
    started: float
    params: dict[str, str]
    # the same session as audit records name it
    audit: records.SessionInfo
    # the server's major version, from its login (pg_catalog's names differ between releases)
    server_version: int = 0


# Builds the per-session gate and observer (policy, masking, audit, recording); None = allow all.
# The second argument writes to the client at any time (NoticeResponse while a statement waits).
SessionHooks = Callable[[SessionInfo, Callable[[bytes], None]], tuple[Gate | None, Observer | None]]
