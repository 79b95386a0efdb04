"""Two operator replicas are safe: kopf peering keeps one of them active, and a rotation cannot
run twice even when two replicas reconcile the same DatabaseConnection at the same moment.

The concurrency tests run the real DatabaseConnection handler twice at once, as two replicas
would (two Runtimes: separate API clients, separate in-process locks, separate database
connections) against kmock's emulator and the real PostgreSQL, with a clock they share so a
rotation is due. kopf peering is checked in its settings and with the real operator against the
emulator's ClusterKopfPeering.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kopf
import pg8000.native
import pytest
from fix_emulator import advertise, client_for, eventually
from test_operator_emulated import NS, PGW, admin_secret, can_login, connection, operator, read_secret

from pgwarden.k8s import client as kube
from pgwarden.operator import database, roles_sql
from pgwarden.operator.handlers import connection as handler
from pgwarden.operator.main import configure_kopf, settings_from_args
from pgwarden.operator.runtime import Runtime
from pgwarden.operator.settings import OperatorSettings, RotationSettings, WebhookSettings

pytestmark = pytest.mark.slow
LOG = logging.getLogger("test.peering")
# the spec's own units (rotationInterval 3m, gracePeriod 2m): the shared fake clock moves instead
INTERVAL, GRACE = 180.0, 120.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def replica(emulator: kmock.KubernetesEmulator, clock: Clock) -> Runtime:
    settings = OperatorSettings(rotation=RotationSettings(retry_delay=1.0), webhook=WebhookSettings(enabled=False))
    return Runtime(settings, client_for(emulator), clock=clock)


def role_versions(pg: Any, prefix: str) -> dict[str, tuple[bool, int]]:
    """role -> (can log in, version recorded in its comment): what the database says happened."""
    con = pg8000.native.Connection(user=pg.superuser, password=pg.password, host=pg.host, port=pg.port,
                                   database="shop")
    try:
        names = [f"{prefix}_a", f"{prefix}_b"]
        state, _ = database.read_state(con, (names[0], names[1]), None)
    finally:
        con.close()
    return {r.name: (r.can_login, r.version) for r in state.roles()}


async def waiting_for_lock(pg: Any, key: int, n: int) -> bool:
    out = await asyncio.to_thread(
        pg.psql, f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                 f"AND objid = {key & 0xFFFFFFFF}")
    return int(out.strip()) >= n


async def together(body: dict[str, Any], replicas: list[Runtime]) -> list[dict[str, Any]]:
    """One reconcile per replica, all at once; every one must finish without error."""
    patches: list[dict[str, Any]] = [{} for _ in replicas]
    await asyncio.gather(*(handler.reconcile(body, p, r, LOG) for p, r in zip(patches, replicas, strict=True)))
    return patches


@contextlib.asynccontextmanager
async def lock_held(pg: Any, key: int) -> AsyncIterator[None]:
    """Hold the rotation lock from outside, so every replica queues up behind it (worst case:
    each has already looked at the Secret and at the cluster before any of them writes)."""
    con = await asyncio.to_thread(pg8000.native.Connection, user=pg.superuser, password=pg.password,
                                  host=pg.host, port=pg.port, database="shop")
    await asyncio.to_thread(con.run, f"SELECT pg_advisory_lock({key})")
    try:
        yield
    finally:
        await asyncio.to_thread(con.run, f"SELECT pg_advisory_unlock({key})")
        await asyncio.to_thread(con.close)


async def test_two_replicas_rotate_once(kmock: kmock.KubernetesEmulator, pg: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # outside a running kopf there is no event queue: record the Events the handlers post instead
    events: list[str] = []
    monkeypatch.setattr(kopf, "info", lambda _obj, *, reason, message="", **_: events.append(reason))
    monkeypatch.setattr(kopf, "warn", lambda _obj, *, reason, message="", **_: events.append(reason))
    advertise(kmock)
    k = client_for(kmock)
    clock = Clock()
    one, two = replica(kmock, clock), replica(kmock, clock)
    await k.create(kube.path("v1", "secrets", NS), admin_secret(pg))
    body = await k.create(kube.path(PGW, "databaseconnections", NS), connection(pg, name="twin"))
    key = roles_sql.lock_key("pgw_twin")
    try:
        # bootstrap, both at once: one role, version 1
        await together(body, [one, two])
        first = await read_secret(k, "twin-pgwarden-credentials")
        assert first is not None and (first["username"], first["version"]) == ("pgw_twin_a", "1")
        assert events == ["CredentialsBootstrap"]
        assert role_versions(pg, "pgw_twin") == {"pgw_twin_a": (True, 1), "pgw_twin_b": (False, 0)}

        # a rotation is due; both replicas reconcile at the same moment, queued behind the lock
        clock.now += INTERVAL + 1
        async with lock_held(pg, key):
            racing = asyncio.ensure_future(together(body, [one, two]))
            await eventually(lambda: waiting_for_lock(pg, key, 2), what="both replicas waiting for the rotation lock")
        patches = await racing
        # exactly one rotation: B got version 2, nobody re-passworded it a second time
        assert role_versions(pg, "pgw_twin") == {"pgw_twin_a": (True, 1), "pgw_twin_b": (True, 2)}
        second = await read_secret(k, "twin-pgwarden-credentials")
        assert second is not None and (second["username"], second["version"]) == ("pgw_twin_b", "2")
        assert can_login(pg, second["username"], second["password"]), "the Secret must hold the live password"
        assert can_login(pg, first["username"], first["password"]), "A is in its grace period"
        actions = sorted(p["status"]["credentials"].get("lastAction", "-") for p in patches)
        assert actions == ["-", "rotate"]
        assert {p["status"]["credentials"]["version"] for p in patches} == {2}
        assert events[1:] == ["CredentialsRotate"]

        # grace over: exactly one retire, same version, the Secret untouched
        clock.now += GRACE + 1
        async with lock_held(pg, key):
            racing = asyncio.ensure_future(together(body, [one, two, one, two]))
            await eventually(lambda: waiting_for_lock(pg, key, 2), what="replicas waiting for the lock")
        await racing
        assert role_versions(pg, "pgw_twin") == {"pgw_twin_a": (False, 1), "pgw_twin_b": (True, 2)}
        assert not can_login(pg, first["username"], first["password"])
        assert await read_secret(k, "twin-pgwarden-credentials") == second
        assert events[2:] == ["CredentialsRetire"]

        # the next rotation, without the outside lock, four reconciles at once: back to A, once
        clock.now += INTERVAL
        await together(body, [one, two, one, two])
        assert role_versions(pg, "pgw_twin") == {"pgw_twin_a": (True, 3), "pgw_twin_b": (True, 2)}
        third = await read_secret(k, "twin-pgwarden-credentials")
        assert third is not None and (third["username"], third["version"]) == ("pgw_twin_a", "3")
        assert can_login(pg, third["username"], third["password"])
        assert events[3:] == ["CredentialsRotate"]
    finally:
        admin = database.AdminCredentials(pg.superuser, pg.password)
        await asyncio.to_thread(database.drop_roles, handler.parse(body), admin)
        for r in (one, two):
            await r.kube.close()
        await k.close()


def test_kopf_peering_settings() -> None:
    """Peering is on by default, cluster-wide, mandatory, and each replica gets its own priority
    (kopf pauses *every* operator when two peers share a priority)."""
    ours = OperatorSettings()
    a, b = kopf.OperatorSettings(), kopf.OperatorSettings()
    configure_kopf(a, ours)
    configure_kopf(b, ours)
    assert (a.peering.name, a.peering.mandatory, a.peering.clusterwide) == ("pgwarden", True, True)
    assert a.peering.priority != b.peering.priority

    namespaced = kopf.OperatorSettings()
    configure_kopf(namespaced, OperatorSettings(namespaces=("agents",)))
    assert namespaced.peering.clusterwide is False

    standalone = settings_from_args(argparse.Namespace(standalone=True, namespace=None))
    assert standalone.peering_name is None


async def test_peered_operator_against_the_emulator(kmock: kmock.KubernetesEmulator, pg: Any) -> None:
    """The operator with peering on (the default) starts against the mandatory ClusterKopfPeering,
    announces itself there with its own priority, and does its work: peering is not a switch
    that only the unit test above sees."""
    advertise(kmock)
    k = client_for(kmock)
    await k.create(kube.path("kopf.dev/v1", "clusterkopfpeerings"),
                   {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "pgwarden"}})
    await k.create(kube.path("v1", "secrets", NS), admin_secret(pg))
    settings = OperatorSettings(rotation=RotationSettings(time_scale=1 / 60, retry_delay=1.0, check_interval=0.5),
                                webhook=WebhookSettings(enabled=False), peering_priority=7)
    assert settings.peering_name == "pgwarden"
    body: dict[str, Any] | None = None
    try:
        async with operator(kmock, settings):
            async def peers() -> dict[str, Any] | None:
                obj = await k.get(kube.path("kopf.dev/v1", "clusterkopfpeerings", None, "pgwarden"))
                return ((obj or {}).get("status") or None)

            announced = await eventually(peers, what="the operator in the peering object")
            assert [p["priority"] for p in announced.values()] == [7]
            body = await k.create(kube.path(PGW, "databaseconnections", NS), connection(pg, name="peer"))
            s = await eventually(lambda: read_secret(k, "peer-pgwarden-credentials"), what="credentials Secret")
            assert s["username"] == "pgw_peer_a" and can_login(pg, s["username"], s["password"])
    finally:
        if body is not None:
            admin = database.AdminCredentials(pg.superuser, pg.password)
            await asyncio.to_thread(database.drop_roles, handler.parse(body), admin)
        await k.close()


async def _async(value: Any) -> Any:
    return value
