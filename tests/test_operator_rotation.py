"""The rotation plan and the SQL that applies it: pure functions, no database."""

from __future__ import annotations

import pytest

from pgwarden.operator import roles_sql
from pgwarden.operator.rotation import (
    Action,
    LoginRole,
    RotationPlan,
    RotationSpec,
    RotationState,
    plan_rotation,
)

SPEC = RotationSpec(interval=3600, grace=120)
A, B = "pgw_orders_a", "pgw_orders_b"


def state(a: LoginRole | None = None, b: LoginRole | None = None, secret: int | None = None) -> RotationState:
    return RotationState(a=a or LoginRole(A), b=b or LoginRole(B), secret_version=secret)


def live(name: str, version: int, at: float) -> LoginRole:
    return LoginRole(name, exists=True, can_login=True, version=version, activated_at=at)


def retired(name: str, version: int, at: float) -> LoginRole:
    return LoginRole(name, exists=True, can_login=False, version=version, activated_at=at)


def apply(s: RotationState, p: RotationPlan) -> RotationState:
    """What the database looks like after the plan (mirrors roles_sql.plan_sql)."""
    roles = {r.name: r for r in s.roles()}
    if p.retire:
        r = roles[p.retire]
        roles[p.retire] = LoginRole(r.name, True, False, r.version, r.activated_at)
    if p.target:
        roles[p.target] = live(p.target, p.version, p.activated_at or 0)
    return RotationState(roles[A], roles[B], secret_version=p.version if p.writes_secret else s.secret_version)


class TestPlan:
    def test_bootstrap_activates_a(self) -> None:
        p = plan_rotation(state(), now=1000, spec=SPEC)
        assert p.action is Action.BOOTSTRAP and p.target == A and p.active == A and p.version == 1
        assert p.valid_until == 1000 + 2 * 3600 + 120
        assert p.next_rotation_at == 1000 + 3600

    def test_nothing_due(self) -> None:
        p = plan_rotation(state(live(A, 1, 1000), secret=1), now=2000, spec=SPEC)
        assert p.action is Action.NONE and p.wake_at == 4600 and p.target is None

    def test_rotate_when_interval_passed(self) -> None:
        p = plan_rotation(state(live(A, 1, 1000), retired(B, 0, None), secret=1), now=4600, spec=SPEC)
        assert p.action is Action.ROTATE and p.target == B and p.active == B and p.version == 2
        assert p.retire is None  # the old role keeps working during the grace period
        assert p.grace_ends_at == 4600 + 120 and p.wake_at == 4720

    def test_valid_until_beyond_next_rotation_and_its_grace(self) -> None:
        p = plan_rotation(state(live(A, 1, 1000), secret=1), now=4600, spec=SPEC)
        assert p.valid_until is not None and p.valid_until > p.next_rotation_at + SPEC.grace

    def test_grace_then_retire(self) -> None:
        s = state(live(A, 1, 1000), live(B, 2, 4600), secret=2)
        during = plan_rotation(s, now=4650, spec=SPEC)
        assert during.action is Action.NONE and during.grace_ends_at == 4720 and during.wake_at == 4720
        after = plan_rotation(s, now=4720, spec=SPEC)
        assert after.action is Action.RETIRE and after.retire == A and after.active == B and after.target is None

    def test_never_two_rotations_at_once(self) -> None:
        # operator was down for three intervals while B was still in grace: retire first, one step at a time
        s = state(live(A, 1, 1000), live(B, 2, 4600), secret=2)
        p = plan_rotation(s, now=4600 + 3 * 3600, spec=SPEC)
        assert p.action is Action.RETIRE and p.target is None
        p2 = plan_rotation(apply(s, p), now=4600 + 3 * 3600, spec=SPEC)
        assert p2.action is Action.ROTATE and p2.target == A and p2.version == 3
        # and right after that rotation nothing else is due until its grace ends
        p3 = plan_rotation(apply(apply(s, p), p2), now=4600 + 3 * 3600 + 1, spec=SPEC)
        assert p3.action is Action.NONE

    def test_repair_lost_secret(self) -> None:
        p = plan_rotation(state(live(A, 4, 1000), secret=None), now=2000, spec=SPEC)
        assert p.action is Action.REPAIR and p.target == A and p.active == A and p.version == 5
        assert p.activated_at == 1000  # the rotation schedule is not reset

    def test_repair_stale_secret_during_grace(self) -> None:
        p = plan_rotation(state(live(A, 1, 1000), live(B, 2, 4600), secret=1), now=4610, spec=SPEC)
        assert p.action is Action.REPAIR and p.target == B

    def test_versions_only_grow(self) -> None:
        s = state(secret=7)
        now = 0.0
        seen = []
        for _ in range(12):
            p = plan_rotation(s, now, SPEC)
            seen.append(p.version)
            s = apply(s, p)
            now = p.wake_at
        assert seen == sorted(seen) and seen[0] == 8
        assert sum(1 for r in s.roles() if r.can_login) >= 1

    def test_at_most_one_plus_grace_live(self) -> None:
        s, now = state(), 0.0
        for _ in range(20):
            p = plan_rotation(s, now, SPEC)
            s = apply(s, p)
            live_roles = [r for r in s.roles() if r.can_login]
            assert 1 <= len(live_roles) <= 2
            if len(live_roles) == 2:  # both only within the grace period
                newest = max(live_roles, key=lambda r: r.version)
                assert now < (newest.activated_at or 0) + SPEC.grace + 1e-9 or p.action is Action.ROTATE
            now = p.wake_at

    def test_spec_rejects_grace_not_shorter_than_interval(self) -> None:
        with pytest.raises(ValueError):
            RotationSpec(interval=60, grace=60)


class TestSQL:
    def test_quote_ident_and_literal(self) -> None:
        assert roles_sql.quote_ident('we"ird') == '"we""ird"'
        assert roles_sql.quote_literal("it's") == "'it''s'"
        assert roles_sql.quote_literal("a\\b") == "E'a\\\\b'"
        with pytest.raises(ValueError):
            roles_sql.quote_literal("a\x00")

    def test_create_has_only_login_and_grants(self) -> None:
        plan = plan_rotation(state(), now=0, spec=SPEC)
        stmts = roles_sql.plan_sql(plan, connection="agents/orders", exists={}, grant_roles=["orders_reader", "orders_writer"],
                                   password="pw", salt=b"0" * 16)
        create = stmts[0]
        assert create.startswith(f'CREATE ROLE "{A}" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS')
        assert create.endswith('IN ROLE "orders_reader", "orders_writer"')
        assert "PASSWORD 'SCRAM-SHA-256$4096:" in create and "'pw'" not in create
        assert "VALID UNTIL '1970-01-01T02:02:00+00:00'" in create
        assert stmts[1].startswith(f'COMMENT ON ROLE "{A}" IS ')

    def test_rotate_alters_existing_role(self) -> None:
        plan = plan_rotation(state(live(A, 1, 0), retired(B, 0, None), secret=1), now=3600, spec=SPEC)
        stmts = roles_sql.plan_sql(plan, connection="c", exists={A: True, B: True}, grant_roles=[], password="x")
        assert stmts[0].startswith(f'ALTER ROLE "{B}" WITH LOGIN NOSUPERUSER')

    def test_retire_disables_and_terminates(self) -> None:
        plan = plan_rotation(state(live(A, 1, 0), live(B, 2, 3600), secret=2), now=3720, spec=SPEC)
        stmts = roles_sql.plan_sql(plan, connection="c", exists={A: True, B: True}, grant_roles=[], password=None)
        assert stmts == [f'ALTER ROLE "{A}" WITH NOLOGIN PASSWORD NULL',
                         f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{A}' AND pid <> pg_backend_pid()"]

    def test_none_is_no_sql(self) -> None:
        plan = plan_rotation(state(live(A, 1, 0), secret=1), now=10, spec=SPEC)
        assert roles_sql.plan_sql(plan, connection="c", exists={A: True}, grant_roles=[], password=None) == []

    def test_sync_grants(self) -> None:
        assert roles_sql.sync_grants_sql("r", ["a", "old"], ["a", "new"]) == ['GRANT "new" TO "r"', 'REVOKE "old" FROM "r"']

    def test_scram_verifier_matches_scramp(self) -> None:
        import base64

        import scramp

        v = roles_sql.scram_verifier("secret", salt=b"s" * 16)
        salt, stored, server, it = scramp.ScramMechanism().make_auth_info("secret", iteration_count=4096, salt=b"s" * 16)
        assert v == (f"SCRAM-SHA-256$4096:{base64.b64encode(salt).decode()}$"
                     f"{base64.b64encode(stored).decode()}:{base64.b64encode(server).decode()}")

    def test_passwords_are_random(self) -> None:
        assert len({roles_sql.new_password() for _ in range(50)}) == 50
        assert len(roles_sql.new_password()) >= 40
