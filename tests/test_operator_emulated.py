"""The running operator (kopf, cluster-wide) against kmock's KubernetesEmulator over HTTP, with a
real PostgreSQL: roles are created, passwords rotate, the old role stops working after the grace
period, the Secret, the bundle and the statuses follow, and deletion cleans up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import kmock
import pg8000.exceptions
import pg8000.native
import pytest
from fix_emulator import advertise, client_for, eventually, watches_subscribed

from pgwarden.k8s import client as kube
from pgwarden.k8s.names import API_VERSION as PGW
from pgwarden.operator import credentials
from pgwarden.operator.main import run
from pgwarden.operator.runtime import Runtime
from pgwarden.operator.settings import OperatorSettings, RotationSettings, WebhookSettings

NS = "agents"
pytestmark = pytest.mark.slow

# rotationInterval 3m and gracePeriod 2m in the spec (valid for the CRD), scaled to 3s / 2s
FAST = OperatorSettings(
    rotation=RotationSettings(time_scale=1 / 60, retry_delay=1.0, check_interval=0.5),
    webhook=WebhookSettings(enabled=False),
    peering_name=None,
)


@contextlib.asynccontextmanager
async def operator(emulator: kmock.KubernetesEmulator, settings: OperatorSettings = FAST, *,
                   standby: bool = False) -> AsyncIterator[Runtime]:
    """The operator running until the block ends; once its watches are subscribed unless it
    starts as a paused peer (`standby`), which watches nothing."""
    runtime = Runtime(settings, client_for(emulator))
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(runtime, stop_flag=stop, ready_flag=ready))
    await asyncio.wait_for(ready.wait(), 15)
    try:
        if not standby:
            await watches_subscribed(emulator)
        yield runtime
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def admin_secret(pg: Any, name: str = "shop-admin", **override: str) -> dict[str, Any]:
    data = {"username": pg.superuser, "password": pg.password, **override}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
            "data": {k: credentials.b64(v) for k, v in data.items()}}


def connection(pg: Any, name: str = "shop", admin: str = "shop-admin", **creds: Any) -> dict[str, Any]:
    # the emulator keeps no resourceVersion of its own; kopf's finalizer patch tests for one
    return {
        "apiVersion": PGW, "kind": "DatabaseConnection",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "1", "generation": 1},
        "spec": {"host": pg.host, "port": pg.port, "database": "shop", "sslMode": "disable",
                 "adminSecretRef": {"name": admin},
                 "credentials": {"grantRoles": ["shop_reader"], "rotationInterval": "3m", "gracePeriod": "2m",
                                 **creds}},
    }


def login(pg: Any, user: str, password: str) -> pg8000.native.Connection:
    return pg8000.native.Connection(user=user, password=password, host=pg.host, port=pg.port, database="shop", timeout=5)


def can_login(pg: Any, user: str, password: str) -> bool:
    try:
        login(pg, user, password).close()
    except Exception:
        return False
    return True


def roles(pg: Any, prefix: str) -> dict[str, str]:
    out = pg.psql(f"SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls "
                  f"FROM pg_roles WHERE rolname LIKE '{prefix}%' ORDER BY 1")
    return {line.split("|")[0]: line for line in out.splitlines() if line}


async def read_secret(k: kube.Kube, name: str) -> dict[str, str] | None:
    s = await k.get(kube.path("v1", "secrets", NS, name))
    if not s:
        return None
    return {key: credentials.unb64(v) for key, v in (s.get("data") or {}).items()}


async def test_rotation_lifecycle(kmock: kmock.KubernetesEmulator, pg: Any) -> None:
    advertise(kmock)
    k = client_for(kmock)
    await k.create(kube.path("v1", "secrets", NS), admin_secret(pg))
    async with operator(kmock):
        await k.create(kube.path(PGW, "databaseconnections", NS), connection(pg))

        first = await eventually(lambda: read_secret(k, "shop-pgwarden-credentials"), what="credentials Secret")
        assert first["username"] == "pgw_shop_a" and first["version"] == "1"
        assert {k_: first[k_] for k_ in ("host", "port", "database", "sslmode")} == {
            "host": pg.host, "port": str(pg.port), "database": "shop", "sslmode": "disable"}
        assert can_login(pg, first["username"], first["password"])
        # LOGIN and membership in grantRoles, nothing else
        row = roles(pg, "pgw_shop_a")["pgw_shop_a"]
        assert row == "pgw_shop_a|t|f|f|f|f|f"
        member = pg.psql("SELECT pg_has_role('pgw_shop_a', 'shop_reader', 'MEMBER'), "
                         "pg_has_role('pgw_shop_a', 'shop_writer', 'MEMBER')")
        assert member.strip() == "t|f"
        held = login(pg, first["username"], first["password"])  # a session of the old role, open across rotation

        async def status() -> dict[str, Any]:
            obj = await k.get(kube.path(PGW, "databaseconnections", NS, "shop"))
            return (obj or {}).get("status") or {}

        st = await eventually(lambda: _when(status(), lambda s: s.get("phase") == "Ready"), what="phase Ready")
        conds = {c["type"]: c for c in st["conditions"]}
        assert conds["Reachable"]["status"] == "True" and conds["Reachable"]["message"].startswith("PostgreSQL ")
        assert conds["CredentialsReady"]["status"] == "True"
        assert st["serverVersion"] and st["credentials"]["activeRole"] == "pgw_shop_a"

        # rotation after 3s: B gets a password, the Secret follows; A still works in its grace period
        second = await eventually(lambda: _when(read_secret(k, "shop-pgwarden-credentials"),
                                                lambda s: s["version"] == "2"), timeout=15, what="rotation")
        assert second["username"] == "pgw_shop_b" and second["password"] != first["password"]
        assert can_login(pg, second["username"], second["password"])
        assert can_login(pg, first["username"], first["password"]), "the old role must work during the grace period"
        assert held.run("SELECT 1") == [[1]]

        # after the grace period (2s) the old role is disabled and its sessions are gone
        await eventually(lambda: _async(not can_login(pg, first["username"], first["password"])), timeout=10,
                         what="old role disabled")
        with pytest.raises((pg8000.exceptions.InterfaceError, pg8000.exceptions.DatabaseError)):
            held.run("SELECT 1")  # terminated by pg_terminate_backend
        assert can_login(pg, second["username"], second["password"])
        st = await status()
        assert st["credentials"]["activeRole"] == "pgw_shop_b" and st["credentials"]["version"] >= 2

        # the next rotation goes back to A, with a fresh password
        third = await eventually(lambda: _when(read_secret(k, "shop-pgwarden-credentials"),
                                               lambda s: s["version"] == "3"), timeout=15, what="second rotation")
        assert third["username"] == "pgw_shop_a" and third["password"] != first["password"]
        assert can_login(pg, third["username"], third["password"])
        assert not can_login(pg, first["username"], first["password"])

        # deletion: finalizer drops both roles and removes the Secret
        await k.delete(kube.path(PGW, "databaseconnections", NS, "shop"))
        await eventually(lambda: _async(not roles(pg, "pgw_shop_")), timeout=15, what="roles dropped")
        await eventually(lambda: _is_none(read_secret(k, "shop-pgwarden-credentials")), timeout=10, what="Secret removed")
        await eventually(lambda: _is_none(k.get(kube.path(PGW, "databaseconnections", NS, "shop"))), timeout=10,
                         what="finalizer released")
    await k.close()


async def test_missing_and_wrong_admin_secret_are_reported(kmock: kmock.KubernetesEmulator, pg: Any) -> None:
    advertise(kmock)
    k = client_for(kmock)
    async with operator(kmock):
        await k.create(kube.path(PGW, "databaseconnections", NS), connection(pg, name="nosecret", admin="absent"))

        async def cond(name: str) -> dict[str, Any] | None:
            obj = await k.get(kube.path(PGW, "databaseconnections", NS, name))
            c = {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}
            return c.get("CredentialsReady")

        c = await eventually(lambda: cond("nosecret"), what="condition for the missing Secret")
        assert c["status"] == "False" and c["reason"] == "AdminSecretInvalid"
        assert f"admin Secret {NS}/absent does not exist" in c["message"]

        await k.create(kube.path("v1", "secrets", NS), admin_secret(pg, name="wrong", password="not-it"))
        await k.create(kube.path(PGW, "databaseconnections", NS), connection(pg, name="wrongpw", admin="wrong"))
        c = await eventually(lambda: cond("wrongpw"), what="condition for the wrong password")
        assert c["reason"] == "AuthenticationFailed" and "fix the username/password keys" in c["message"]

        await k.create(kube.path("v1", "secrets", NS), {"apiVersion": "v1", "kind": "Secret",
                                                          "metadata": {"name": "nokeys", "namespace": NS}, "data": {}})
        await k.create(kube.path(PGW, "databaseconnections", NS), connection(pg, name="nokeys", admin="nokeys"))
        c = await eventually(lambda: cond("nokeys"), what="condition for the Secret without keys")
        assert "lacks key(s) username, password" in c["message"]

        # the problem is posted as an Event too (kubectl describe); the emulator stores only the
        # first of several generateName'd events, so look at what the operator sent
        async def posted_event() -> bool:  # kopf posts events from a background queue
            posted = [r.data for r in kmock if r.resource is not None and r.resource.plural == "events"
                      and isinstance(r.data, dict)]
            return any(e.get("reason") == "AdminSecretInvalid" and "does not exist" in e.get("message", "")
                       for e in posted)

        assert await eventually(posted_event, what="a warning Event about the missing Secret")
    await k.close()


async def test_each_connection_keeps_its_own_status(kmock: kmock.KubernetesEmulator, pg: Any) -> None:
    """Two broken connections side by side, their rotation timers firing every half second: each
    status keeps saying what is wrong with that connection's own admin Secret (kopf tells objects
    apart by the uid the API server assigns; a timer of one must never patch the other)."""
    advertise(kmock)
    k = client_for(kmock)
    await k.create(kube.path("v1", "secrets", NS), admin_secret(pg, name="wrong", password="not-it"))
    async with operator(kmock):
        await k.create(kube.path(PGW, "databaseconnections", NS), connection(pg, name="nosecret", admin="absent"))
        await k.create(kube.path(PGW, "databaseconnections", NS), connection(pg, name="wrongpw", admin="wrong"))
        uids = {(await k.get(kube.path(PGW, "databaseconnections", NS, n)))["metadata"]["uid"]
                for n in ("nosecret", "wrongpw")}
        assert len(uids) == 2

        async def reasons() -> dict[str, str] | None:
            out = {}
            for name in ("nosecret", "wrongpw"):
                obj = await k.get(kube.path(PGW, "databaseconnections", NS, name))
                c = {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}
                if "CredentialsReady" not in c:
                    return None
                out[name] = c["CredentialsReady"]["reason"]
            return out

        await eventually(reasons, what="both conditions")
        seen = []
        for _ in range(15):  # several timer rounds of both connections
            seen.append(await reasons())
            await asyncio.sleep(0.2)
        assert all(r == {"nosecret": "AdminSecretInvalid", "wrongpw": "AuthenticationFailed"} for r in seen), seen
    await k.close()


async def test_policies_compile_into_the_bundle(kmock: kmock.KubernetesEmulator, pg: Any) -> None:
    advertise(kmock)
    k = client_for(kmock)
    await k.create(kube.path("v1", "secrets", NS), admin_secret(pg))
    masking = {"apiVersion": PGW, "kind": "MaskingRule", "metadata": {"name": "pii", "namespace": NS},
               "spec": {"connectionRef": {"name": "shop"},
                        "columns": [{"table": "public.customers", "column": "email", "strategy": "email"},
                                    {"table": "public.nosuchtable", "column": "x", "strategy": "redact"}]}}
    async with operator(kmock):
        await k.create(kube.path(PGW, "databaseconnections", NS), connection(pg))
        await k.create(kube.path(PGW, "maskingrules", NS), masking)
        cm_path = kube.path("v1", "configmaps", NS, "shop-pgwarden-bundle")

        async def bundle_with(text: str) -> dict[str, Any] | None:
            cm = await k.get(cm_path)
            return cm if cm and text in cm["data"]["bundle.yaml"] else None

        cm = await eventually(lambda: bundle_with("public.customers"), what="bundle with the masking rule")
        assert "adminSecretRef" not in cm["data"]["bundle.yaml"]
        assert "kind: ProxyConfig" in cm["data"]["proxy.yaml"] and "credentialsDir: /etc/pgwarden/credentials" in cm["data"]["proxy.yaml"]
        good_digest = cm["data"]["digest"]

        async def mask_status() -> dict[str, Any] | None:
            obj = await k.get(kube.path(PGW, "maskingrules", NS, "pii"))
            st = (obj or {}).get("status") or {}
            return st if st.get("phase") else None

        st = await eventually(mask_status, what="MaskingRule status")
        assert st["phase"] == "Valid"
        assert any("nosuchtable does not exist" in w for w in st["warnings"])

        # an invalid object never replaces the last good bundle
        await k.patch(kube.path(PGW, "maskingrules", NS, "pii"),
                      {"metadata": {"generation": 2}, "spec": {"columns": [{"table": "customers", "column": "email"}]}})
        st = await eventually(lambda: _when(mask_status(), lambda s: s["phase"] == "Invalid"), what="Invalid status")
        assert any("schema.table" in e for e in st["errors"])
        cm = await k.get(cm_path)
        assert cm is not None and cm["data"]["digest"] == good_digest
    await k.close()


async def _when(aw: Any, pred: Any) -> Any:
    value = await aw
    return value if value and pred(value) else None


async def _async(value: Any) -> Any:
    return value


async def _is_none(aw: Any) -> bool:
    return (await aw) is None


def test_settings_are_scaled_not_validation() -> None:
    """Tests shrink time through RotationSettings.time_scale; the spec still says 3m."""
    assert replace(FAST).rotation.time_scale == 1 / 60
    assert OperatorSettings().rotation.time_scale == 1.0


async def test_a_connection_never_takes_over_objects_it_did_not_make(kmock: kmock.KubernetesEmulator, pg: Any) -> None:
    """credentials.secretName naming the admin Secret: the operator neither overwrites nor
    deletes it, and says why in the connection's condition; a bundle ConfigMap name taken by
    someone else is left alone as well."""
    advertise(kmock)
    k = client_for(kmock)
    await k.create(kube.path("v1", "secrets", NS), admin_secret(pg))
    foreign_cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other-pgwarden-bundle", "namespace": NS},
                  "data": {"app.conf": "mine"}}
    await k.create(kube.path("v1", "configmaps", NS), foreign_cm)
    async with operator(kmock):
        await k.create(kube.path(PGW, "databaseconnections", NS), connection(pg, name="grabby", secretName="shop-admin"))

        async def cond(name: str, kind: str) -> dict[str, Any] | None:
            obj = await k.get(kube.path(PGW, "databaseconnections", NS, name))
            return {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}.get(kind)

        c = await eventually(lambda: cond("grabby", "CredentialsReady"), what="CredentialsReady")
        assert c["status"] == "False" and c["reason"] == "SecretNotOwned"
        assert "not made by pgwarden" in c["message"] and "spec.credentials.secretName" in c["message"]
        assert await read_secret(k, "shop-admin") == {"username": pg.superuser, "password": pg.password}
        assert not roles(pg, "pgw_grabby"), "nothing is rotated for a Secret pgwarden cannot write"

        # a connection whose bundle ConfigMap name is taken
        await k.create(kube.path(PGW, "databaseconnections", NS), connection(pg, name="other"))
        c = await eventually(lambda: _when(cond("other", "BundleReady"), lambda c: c["status"] == "False"),
                             timeout=60, what="BundleReady False")
        assert c["reason"] == "ConfigMapNotOwned"
        cm = await k.get(kube.path("v1", "configmaps", NS, "other-pgwarden-bundle"))
        assert cm is not None and cm["data"] == {"app.conf": "mine"}

        # deleting the connections deletes neither object
        for name in ("grabby", "other"):
            await k.delete(kube.path(PGW, "databaseconnections", NS, name))
            await eventually(lambda n=name: _is_none(k.get(kube.path(PGW, "databaseconnections", NS, n))), timeout=15,
                             what="finalizer released")
        assert await read_secret(k, "shop-admin") == {"username": pg.superuser, "password": pg.password}
        assert (await k.get(kube.path("v1", "configmaps", NS, "other-pgwarden-bundle")))["data"] == {"app.conf": "mine"}
    await k.close()


async def test_a_hand_edited_bundle_is_repaired(kmock: kmock.KubernetesEmulator, pg: Any) -> None:
    """Whoever can edit ConfigMaps could loosen the policy the sidecars load while keeping the
    digest key: the operator compares all of the ConfigMap and writes the compiled bundle back."""
    advertise(kmock)
    k = client_for(kmock)
    await k.create(kube.path("v1", "secrets", NS), admin_secret(pg))
    cm_path = kube.path("v1", "configmaps", NS, "shop-pgwarden-bundle")
    async with operator(kmock):
        await k.create(kube.path(PGW, "databaseconnections", NS), connection(pg))
        good = await eventually(lambda: k.get(cm_path), what="bundle ConfigMap")
        await k.patch(cm_path, {"data": {"bundle.yaml": "kind: AccessPolicy  # everything allowed now", "extra": "x"}})

        async def repaired() -> dict[str, Any] | None:
            cm = await k.get(cm_path)
            return cm if cm and cm["data"] == good["data"] else None

        await eventually(repaired, timeout=15, what="the compiled bundle written back")
    await k.close()
