"""Authenticating the client: static users with SCRAM-SHA-256, or a token sent as the password.

SCRAM is done by `scramp` in both directions — no hand-rolled crypto. A token (OIDC JWT or a
Kubernetes service-account token) arrives as a cleartext password, so it is accepted only over
TLS or from the same host (the sidecar case: the agent talks to 127.0.0.1 in its own pod).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import scramp

from pgwarden.errors import AuthenticationFailed
from pgwarden.proxy import messages as m
from pgwarden.proxy.config import StaticUser
from pgwarden.proxy.wire import Endpoint
from pgwarden.subjects import Identity, Workload

TokenAuthenticator = Callable[[str], Awaitable[Identity]]
MAX_AUTH_MESSAGE = 64 * 1024


def _failed(user: str) -> AuthenticationFailed:
    return AuthenticationFailed(
        f'password authentication failed for user "{user}"',
        hint="Static users need the password from the proxy config; agents send their identity token as the password.",
    )


async def _expect_password(ep: Endpoint) -> bytes:
    kind, payload = await ep.read_message(MAX_AUTH_MESSAGE)
    if kind != m.F_PASSWORD:
        raise AuthenticationFailed(f"expected an authentication response, got message {kind!r}")
    return payload


def _set_client_first(server: scramp.core.ScramServer, client_first: str) -> None:
    """PostgreSQL clients leave the SCRAM user name empty (`n=,`): the startup message names the
    user. scramp refuses an empty name, so it parses a copy with a placeholder name, and the
    proof is then checked against the message exactly as the client sent it."""
    header_end = client_first.find(",", client_first.find(",") + 1) + 1
    bare = client_first[header_end:]
    if bare.startswith("n=,"):
        server.set_client_first(client_first[:header_end] + "n=pgwarden" + bare[2:])
        server.client_first_bare = bare
    else:
        server.set_client_first(client_first)


async def scram_exchange(ep: Endpoint, user: StaticUser) -> None:
    mech = scramp.ScramMechanism("SCRAM-SHA-256")
    server = mech.make_server(lambda _username: user.scram)
    ep.write(m.auth_sasl(["SCRAM-SHA-256"]))
    payload = await _expect_password(ep)
    try:
        name, _, rest = payload.partition(b"\0")
        if name != b"SCRAM-SHA-256" or len(rest) < 4:
            raise AuthenticationFailed(f"unsupported SASL mechanism {name.decode(errors='replace')!r}")
        length = m.I32.unpack_from(rest, 0)[0]
        _set_client_first(server, rest[4 : 4 + length].decode())
        ep.write(m.auth_request(m.AUTH_SASL_CONTINUE, server.get_server_first().encode()))
        payload = await _expect_password(ep)
        server.set_client_final(payload.decode())
        ep.write(m.auth_request(m.AUTH_SASL_FINAL, server.get_server_final().encode()))
    except (scramp.ScramException, UnicodeDecodeError, IndexError) as e:
        raise _failed(user.name) from e


def pod_identity(workload: Workload) -> Identity:
    """The pod's own service account, as Kubernetes names it (kubelet set these via the downward API)."""
    if not (workload.namespace and workload.service_account):
        raise AuthenticationFailed(
            "podIdentity is on but the pod's namespace and service account are unknown",
            hint="The sidecar needs POD_NAMESPACE and POD_SERVICE_ACCOUNT from the downward API; re-inject the pod.",
        )
    ns, sa = workload.namespace, workload.service_account
    return Identity(
        subject=f"system:serviceaccount:{ns}:{sa}",
        groups=("system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"),
        service_account=f"{ns}/{sa}",
        method="pod",
    )


async def authenticate(
    ep: Endpoint,
    params: Mapping[str, str],
    users: Mapping[str, StaticUser],
    token_auth: TokenAuthenticator | None,
    *,
    secure_channel: bool,
    pod: Identity | None = None,
) -> Identity:
    """Run the authentication exchange; raise AuthenticationFailed (28P01).

    `pod` is the sidecar's pod identity, offered only for loopback connections: any container
    of the pod is the same workload, so no password is asked for."""
    user = params.get("user", "")
    if not user:
        raise AuthenticationFailed("no user name was given in the startup message", sqlstate="28000")
    if pod is not None and user not in users:
        return pod
    static = users.get(user)
    if static is not None:
        await scram_exchange(ep, static)
        return Identity(subject=static.name, groups=static.groups, method="static")
    if token_auth is None:
        raise _failed(user)
    if not secure_channel:
        raise AuthenticationFailed(
            "identity tokens are only accepted over TLS or from the local host",
            hint="Connect with sslmode=require, or through the sidecar on 127.0.0.1.",
            sqlstate="28000",
        )
    ep.write(m.auth_request(m.AUTH_CLEARTEXT))
    payload = await _expect_password(ep)
    token = payload.rstrip(b"\0").decode(errors="replace")
    return await token_auth(token)
