"""Errors the agent sees, each with its SQLSTATE (the README lists them), and the user-facing CLI error.

The proxy turns an `AgentError` into a PostgreSQL ErrorResponse in exactly one place
(`pgwarden.proxy.messages.error_response_from`). Every message says what decided and what the
user can do next.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the person at the command line can fix; printed without a traceback."""


class AgentError(Exception):
    """An error reported to the database client as an ErrorResponse."""

    sqlstate = "XX000"
    severity = "ERROR"

    def __init__(self, message: str, *, hint: str = "", detail: str = "", sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail
        if sqlstate:
            self.sqlstate = sqlstate


class PolicyDenied(AgentError):
    """Denied by policy, or a statement the engine cannot understand."""

    sqlstate = "42501"


class StatementLimit(AgentError):
    """A statement beyond what the proxy analyses (its size, its analysis time): refused, not run."""

    sqlstate = "54000"


class ApprovalRequired(AgentError):
    sqlstate = "PW001"


class ApprovalDenied(AgentError):
    sqlstate = "PW002"


class ApprovalExpired(AgentError):
    sqlstate = "PW003"


class TooManyRowsAffected(AgentError):
    """A write changed more rows than its approval's preview or limits.maxAffectedRows allows: undone."""

    sqlstate = "PW005"


class LockedOut(AgentError):
    """Too many refused statements: the session ends and the identity is locked out for a while."""

    sqlstate = "PW006"
    severity = "FATAL"


class RateLimited(AgentError):
    """More statements per minute than the policy's limits.maxStatementsPerMinute; the session goes on."""

    sqlstate = "53400"


class AuditUnavailable(AgentError):
    """The audit record could not be written, so nothing was forwarded."""

    sqlstate = "PW004"


class AuthenticationFailed(AgentError):
    severity = "FATAL"
    sqlstate = "28P01"


class AuthorizationFailed(AgentError):
    """Authenticated, but not allowed to connect here (e.g. unknown database)."""

    severity = "FATAL"
    sqlstate = "28000"


class ProtocolViolation(AgentError):
    severity = "FATAL"
    sqlstate = "08P01"


class UpstreamUnavailable(AgentError):
    severity = "FATAL"
    sqlstate = "08006"
