"""Credential rotation as a pure plan: two login roles (A and B), one active at a time.

The database is the source of truth for the rotation state: each login role carries a comment
`{"pgwarden": {"version": N, "activatedAt": T}}`, and `rolcanlogin` says whether it may still
log in. The operator reads that state under a PostgreSQL advisory lock, asks `plan_rotation`
what to do, applies the plan in the same transaction, and only then writes the Secret. Two
operator replicas therefore cannot rotate twice: the second one re-reads the state under the
lock and finds nothing due.

Timeline of one rotation (interval I, grace G, G < I):

    t0            t0+G                 t0+I                t0+I+G
    A active ...  (B retired)  ....... B gets a new password, A still logs in
                                       Secret -> B         A: NOLOGIN, sessions terminated

A role's VALID UNTIL is set to activation + 2*I + G: beyond the next rotation and its grace, so
an operator outage of up to one interval does not lock the agents out, yet credentials expire on
their own if the operator is gone for good.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class RotationSpec:
    interval: float  # seconds between rotations
    grace: float  # seconds both passwords stay valid after a rotation (< interval)

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.grace < 0 or self.grace >= self.interval:
            raise ValueError(f"need 0 <= grace < interval, got grace={self.grace} interval={self.interval}")

    def validity(self) -> float:
        """How long a freshly set password stays valid (VALID UNTIL - now)."""
        return 2 * self.interval + self.grace


@dataclass(frozen=True)
class LoginRole:
    """What the database says about one of the two login roles."""

    name: str
    exists: bool = False
    can_login: bool = False
    version: int = 0  # 0: never activated
    activated_at: float | None = None


@dataclass(frozen=True)
class RotationState:
    a: LoginRole
    b: LoginRole
    # the `version` key of the credentials Secret; None when the Secret does not exist
    secret_version: int | None = None

    def roles(self) -> tuple[LoginRole, LoginRole]:
        return self.a, self.b

    def other(self, role: LoginRole) -> LoginRole:
        return self.b if role.name == self.a.name else self.a

    def active(self) -> LoginRole | None:
        """The live role with the highest version, if any."""
        live = [r for r in self.roles() if r.exists and r.can_login and r.version > 0]
        return max(live, key=lambda r: r.version) if live else None


class Action(enum.Enum):
    NONE = "none"  # nothing due; look again at wake_at
    BOOTSTRAP = "bootstrap"  # no active role: create/activate one
    ROTATE = "rotate"  # new password on the inactive role, which becomes active
    RETIRE = "retire"  # grace over: old role NOLOGIN, its sessions terminated
    REPAIR = "repair"  # Secret missing or stale: new password on the active role


@dataclass(frozen=True)
class RotationPlan:
    action: Action
    active: str  # the active role after the plan
    version: int  # credentials version after the plan (goes into the Secret)
    target: str | None = None  # role that gets a fresh password (bootstrap/rotate/repair)
    retire: str | None = None  # role to disable and whose sessions to terminate
    activated_at: float | None = None  # activation time of the active role after the plan
    valid_until: float | None = None  # VALID UNTIL for `target`
    next_rotation_at: float = 0.0
    grace_ends_at: float | None = None  # when the previous role gets retired, if pending
    wake_at: float = 0.0  # when the operator should look again
    reason: str = ""

    @property
    def writes_secret(self) -> bool:
        return self.target is not None


def plan_rotation(state: RotationState, now: float, spec: RotationSpec) -> RotationPlan:
    """Decide the one next step. Never plans two rotations at once: a rotation is only planned
    when the previous role has been retired, and each plan changes at most one password."""
    active = state.active()
    if active is None or active.activated_at is None:
        target = state.a
        top = max(state.a.version, state.b.version, state.secret_version or 0)
        other = state.other(target)
        next_at = now + spec.interval
        return RotationPlan(
            action=Action.BOOTSTRAP,
            active=target.name,
            version=top + 1,
            target=target.name,
            retire=other.name if other.exists and other.can_login else None,
            activated_at=now,
            valid_until=now + spec.validity(),
            next_rotation_at=next_at,
            wake_at=next_at,
            reason="no active login role",
        )

    other = state.other(active)
    next_at = active.activated_at + spec.interval
    if other.exists and other.can_login:
        grace_end = active.activated_at + spec.grace
        if now >= grace_end:
            return RotationPlan(
                action=Action.RETIRE,
                active=active.name,
                version=active.version,
                retire=other.name,
                activated_at=active.activated_at,
                next_rotation_at=next_at,
                wake_at=next_at,
                reason=f"grace period of {other.name} is over",
            )
        return _hold(state, active, now, spec, next_at, grace_end, f"{other.name} is in its grace period")

    if now >= next_at:
        grace_end = now + spec.grace
        return RotationPlan(
            action=Action.ROTATE,
            active=other.name,
            version=active.version + 1,
            target=other.name,
            activated_at=now,
            valid_until=now + spec.validity(),
            next_rotation_at=now + spec.interval,
            grace_ends_at=grace_end,
            wake_at=grace_end,
            reason=f"{active.name} has been active for {spec.interval:g}s",
        )
    return _hold(state, active, now, spec, next_at, None, "up to date")


def _hold(
    state: RotationState, active: LoginRole, now: float, spec: RotationSpec, next_at: float,
    grace_end: float | None, reason: str,
) -> RotationPlan:
    """No rotation is due: repair a missing or stale Secret, else wait for the next deadline."""
    if state.secret_version != active.version:
        return _repair(state, active, now, spec, next_at, grace_end)
    return RotationPlan(
        action=Action.NONE,
        active=active.name,
        version=active.version,
        activated_at=active.activated_at,
        next_rotation_at=next_at,
        grace_ends_at=grace_end,
        wake_at=min(next_at, grace_end) if grace_end is not None else next_at,
        reason=reason,
    )


def _repair(
    state: RotationState, active: LoginRole, now: float, spec: RotationSpec, next_at: float,
    grace_end: float | None,
) -> RotationPlan:
    """The Secret does not hold the active role's password (lost, or never written after a
    crash): give the active role a new password and a new version, keep its activation time."""
    version = max(active.version, state.secret_version or 0) + 1
    return RotationPlan(
        action=Action.REPAIR,
        active=active.name,
        version=version,
        target=active.name,
        activated_at=active.activated_at,
        valid_until=now + spec.validity(),
        next_rotation_at=next_at,
        grace_ends_at=grace_end,
        wake_at=min(next_at, grace_end) if grace_end is not None else next_at,
        reason="the credentials Secret is missing or stale",
    )
