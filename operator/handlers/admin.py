"""The admin credentials of a DatabaseConnection, read from its admin Secret.

Both the connection's reconcile (roles, rotation) and the bundle compilation (the live catalog
check) need them; here, below both, so neither handler imports the other.
"""

from __future__ import annotations

from pgwarden.connection import DatabaseConnection
from pgwarden.k8s import client as kube
from pgwarden.operator import credentials, database
from pgwarden.operator.runtime import Runtime


async def read_admin(conn: DatabaseConnection, runtime: Runtime) -> database.AdminCredentials:
    ref = conn.admin_secret_ref
    assert ref is not None
    ns = ref.namespace or conn.namespace
    secret = await runtime.kube.get(kube.path("v1", "secrets", ns, ref.name))
    try:
        user, pw, ca = credentials.read_admin_secret(secret, f"{ns}/{ref.name}")
    except ValueError as e:
        raise database.DatabaseProblem("AdminSecretInvalid", str(e)) from e
    return database.AdminCredentials(user, pw, ca)
