"""What the proxy answered, as results a model can act on (pure functions, no I/O).

The proxy reports every refusal as an ErrorResponse with a SQLSTATE (the README lists them), and a statement
held for a reviewer as a NoticeResponse naming the request. These become typed outcomes with a
`next_step` written for a model, so that a refusal is not mistaken for a transient failure and
retried blindly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal[
    "denied",
    "approval_required",
    "approval_denied",
    "approval_expired",
    "audit_unavailable",
    "too_many_rows",
    "locked_out",
    "authentication_failed",
    "cancelled",
    "database_error",
    "connection_failed",
    "too_many_held",
]

# SQLSTATE → (kind, whether running the same statement again can succeed, the next step)
_BY_SQLSTATE: dict[str, tuple[Kind, bool, str]] = {
    "42501": (
        "denied",
        False,
        "Do not retry the same statement: the policy refused it. Change the statement "
        "(another table, a narrower WHERE) or ask a person to change the policy.",
    ),
    "PW001": (
        "approval_required",
        True,
        "The statement did not run. Ask a reviewer to approve the request; once approved, run the "
        "identical statement again (same text) with the same tool.",
    ),
    "PW002": (
        "approval_denied",
        False,
        "A reviewer denied the statement. Do not send it again: change it or talk to the reviewer.",
    ),
    "PW003": (
        "approval_expired",
        True,
        "Nobody decided in time and the statement did not run. Run it again to create a new request "
        "once a reviewer is available.",
    ),
    "PW004": (
        "audit_unavailable",
        True,
        "Nothing was sent to the database because the audit record could not be written. "
        "Tell a person; retrying will fail until the audit log is writable.",
    ),
    "PW005": (
        "too_many_rows",
        False,
        "The write would have changed more rows than allowed and was undone. Narrow the WHERE clause.",
    ),
    "PW006": (
        "locked_out",
        False,
        "The gate ended the session after too many refusals. Stop and ask a person.",
    ),
    "28P01": (
        "authentication_failed",
        False,
        "The proxy did not accept this server's identity. Tell a person: the token is missing, "
        "expired or not meant for this proxy.",
    ),
    "28000": (
        "authentication_failed",
        False,
        "The proxy did not accept this server's identity for this database. Tell a person.",
    ),
    "57014": ("cancelled", True, "The statement was cancelled before it finished."),
}

_HELD = re.compile(r"needs approval \(request ([^)\s]+)\)")
_CREATED = re.compile(r"request (\S+) was created")


@dataclass(frozen=True)
class Refusal:
    """An ErrorResponse from the proxy or the database, as the model sees it."""

    kind: Kind
    sqlstate: str
    message: str
    hint: str = ""
    detail: str = ""
    retryable: bool = False
    next_step: str = ""
    request: str = ""  # the approval request a PW001/PW002/PW003 names

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "status": "refused" if self.kind != "database_error" else "error",
            "kind": self.kind,
            "sqlstate": self.sqlstate,
            "message": self.message,
        }
        for key in ("hint", "detail", "request"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        d["retryable"] = self.retryable
        d["next_step"] = self.next_step
        return d


@dataclass(frozen=True)
class Held:
    """A statement a policy sent to `review`: it runs only after a person approves it."""

    request: str
    mode: Literal["wait", "defer"]
    message: str
    hint: str = ""
    reviewers: tuple[str, ...] = ()  # from the policy, when the server has it (--config)

    def as_dict(self) -> dict[str, Any]:
        ask = f"Ask a reviewer ({', '.join(self.reviewers)})" if self.reviewers else "Ask a reviewer"
        if self.mode == "wait":
            step = (
                f"The statement is held, not failed. {ask} to approve request {self.request}, "
                f"then call wait_for_approval with request={self.request!r} to get its result. "
                "Do not send the statement again: that would create a second request."
            )
        else:
            step = (
                f"The statement did not run. {ask} to approve request {self.request}; once they "
                "have, call the same tool again with the identical statement: it then runs once."
            )
        d: dict[str, Any] = {
            "status": "held_for_approval",
            "request": self.request,
            "mode": self.mode,
            "message": self.message,
        }
        if self.reviewers:
            d["reviewers"] = list(self.reviewers)
        if self.hint:
            d["reviewer_hint"] = self.hint
        d["next_step"] = step
        return d


@dataclass
class Rows:
    """A statement that ran: its columns, rows (up to the cap) and command tag."""

    columns: list[dict[str, str]] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    row_count: int = -1
    truncated: int = 0  # rows received beyond the cap and not returned
    notes: list[str] = field(default_factory=list)

    def as_dict(self, cap: int) -> dict[str, Any]:
        d: dict[str, Any] = {"status": "ok", "columns": self.columns, "rows": self.rows}
        if self.row_count >= 0:
            d["row_count"] = self.row_count
        notes = list(self.notes)
        if self.truncated:
            notes.append(
                f"Only the first {cap} rows are returned; {self.truncated} more were not. "
                "Add a WHERE clause, an ORDER BY with LIMIT, or an aggregate to see the rest."
            )
        d["truncated"] = bool(self.truncated)
        if notes:
            d["notes"] = notes
        return d


def refusal_from_fields(fields: dict[str, str]) -> Refusal | Held:
    """An ErrorResponse's fields (`C`, `M`, `H`, `D`) → a refusal, or a deferred request (PW001)."""
    code = fields.get("C", "")
    message = fields.get("M", "")
    hint = fields.get("H", "")
    if code == "PW001":
        found = _CREATED.search(message)
        if found:
            return Held(request=found.group(1), mode="defer", message=message, hint=hint)
    kind, retryable, step = _BY_SQLSTATE.get(
        code,
        ("database_error", False, "The database refused the statement; read the message and fix the SQL."),
    )
    named = re.search(r"request (\S+)", message) if code in ("PW001", "PW002", "PW003") else None
    return Refusal(
        kind=kind,
        sqlstate=code,
        message=message,
        hint=hint,
        detail=fields.get("D", ""),
        retryable=retryable,
        next_step=step,
        request=named.group(1) if named else "",
    )


def held_from_notice(fields: dict[str, str]) -> Held | None:
    """The NoticeResponse the proxy sends when it holds a statement for a reviewer (mode: wait)."""
    found = _HELD.search(fields.get("M", ""))
    if found is None or "waiting for a reviewer" not in fields.get("M", ""):
        return None
    return Held(request=found.group(1), mode="wait", message=fields.get("M", ""), hint=fields.get("H", ""))


def connection_failure(what: str, error: BaseException) -> Refusal:
    return Refusal(
        kind="connection_failed",
        sqlstate="08006",
        message=f"{what}: {error}",
        retryable=True,
        next_step="The gate could not be reached; nothing ran. Retry once; if it fails again, tell a person.",
    )
