"""Agents never see an outage: pgbench runs through a live proxy while the real operator (kopf,
against kmock's emulator, with the real PostgreSQL) rotates the login roles several times.

The chain is the production one, with kubelet played by `Kubelet`: the operator writes the
credentials Secret into the emulated API server; `Kubelet` materialises it into a directory the
way kubelet updates a mounted Secret (a timestamped folder, the `..data` symlink swapped
atomically, each key a symlink through `..data`); the proxy's `upstream.credentialsDir` points
at that directory and re-reads it for every new upstream connection.

Rotation runs at `time_scale` 1/30: rotationInterval 3m -> 6s, gracePeriod 2m -> 4s. pgbench
keeps running, run after run, until the operator has rotated three times and retired the role
of the third rotation; every run must report zero failed transactions and no aborted client.

Long-lived sessions: a session holds its upstream login for its whole life, and PostgreSQL
cannot move a session to another role, so a session still open on the old role when its grace
period ends is terminated by the retire step (SQLSTATE 57P01); the client reconnects and gets
the new role. Sessions shorter than the grace period (pgbench without -C, with runs of 2s here;
a pool whose maximum connection lifetime is below gracePeriod in production) never meet it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
from fix_emulator import advertise, client_for, eventually
from fix_proxy import ProxyHandle
from rawpg import RawConn
from test_operator_emulated import NS, PGW, admin_secret, can_login, connection, operator, read_secret

from pgwarden.k8s import client as kube
from pgwarden.operator import database
from pgwarden.operator.handlers import connection as handler
from pgwarden.operator.settings import OperatorSettings, RotationSettings, WebhookSettings
from pgwarden.proxy.config import UpstreamCredentials

pytestmark = pytest.mark.slow

# rotationInterval 3m / gracePeriod 2m in the spec, scaled to 6s / 4s
SETTINGS = OperatorSettings(
    rotation=RotationSettings(time_scale=1 / 30, retry_delay=1.0, check_interval=0.3),
    webhook=WebhookSettings(enabled=False),
    peering_name=None,
)
ROTATIONS = 3
SCRIPT = """\\set id random(1, 5)
BEGIN;
SELECT status, total_cents FROM orders WHERE customer_id = :id;
INSERT INTO audit_scratch (payload) VALUES ('live:' || current_user);
END;
"""


def materialise(target: Path, data: dict[str, str], stamp: str) -> None:
    """Update `target` as kubelet's AtomicWriter updates a Secret volume."""
    target.mkdir(parents=True, exist_ok=True)
    fresh = target / f"..{stamp}"
    fresh.mkdir()
    for key, value in data.items():
        (fresh / key).write_text(value)
    data_link = target / "..data"
    old = os.readlink(data_link) if data_link.is_symlink() else None
    tmp = target / "..data_tmp"
    os.symlink(fresh.name, tmp)
    os.rename(tmp, data_link)  # the atomic switch
    for key in data:
        if not (target / key).is_symlink():
            os.symlink(f"..data/{key}", target / key)
    if old:
        shutil.rmtree(target / old)


class Kubelet:
    """Polls the emulated API for the credentials Secret and materialises every change."""

    def __init__(self, k: kube.Kube, name: str, target: Path) -> None:
        self.k, self.name, self.target = k, name, target
        self.seen: list[dict[str, str]] = []
        self._n = 0

    async def run(self) -> None:
        while True:
            s = await read_secret(self.k, self.name)
            if s and (not self.seen or s != self.seen[-1]):
                self._n += 1
                stamp = dt.datetime.now(dt.UTC).strftime("%Y_%m_%d_%H_%M_%S.%f") + f"{self._n:03d}"
                materialise(self.target, s, stamp)
                self.seen.append(s)
            await asyncio.sleep(0.05)


def pgbench_failures(out: str) -> list[str]:
    """Everything in a pgbench report that says a transaction or a client did not make it."""
    bad = [line for line in out.splitlines()
           if re.search(r"aborted|error|FATAL|could not|connection to server", line, re.I)]
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if failed and int(failed.group(1)):
        bad.append(failed.group(0))
    return bad


async def pgbench_loop(proxy: ProxyHandle, script: Path, extra: list[str], seconds: int, done: asyncio.Event,
                       reports: list[tuple[int, str]]) -> None:
    """pgbench through the proxy, run after run, until `done`."""
    while not done.is_set():
        p = await asyncio.create_subprocess_exec(
            "pgbench", "-n", "-c", "4", "-j", "2", "-T", str(seconds), "-f", str(script), "-M", "simple", *extra,
            env=proxy.env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(p.communicate(), seconds + 30)
        except TimeoutError:  # a stuck transaction: report it instead of hanging the test
            p.kill()
            out = (await p.communicate())[0] + b"\nerror: pgbench did not finish within its time plus 30s"
        reports.append((p.returncode or 0, out.decode(errors="replace")))


def role_state(pg: Any, prefix: str) -> dict[str, tuple[bool, int]]:
    con = database.connect(handler.parse(connection(pg, name="live")),
                           database.AdminCredentials(pg.superuser, pg.password))
    try:
        state, _ = database.read_state(con, (f"{prefix}_a", f"{prefix}_b"), None)
    finally:
        con.close()
    return {r.name: (r.can_login, r.version) for r in state.roles()}


def held_session(proxy: ProxyHandle) -> RawConn:
    return RawConn.login(proxy.host, proxy.port, proxy.user, proxy.password, proxy.dbname, timeout=20)


def current_user(session: RawConn) -> str:
    value = session.simple("SELECT current_user")[0][0]
    assert value is not None
    return value.decode()


async def test_pgbench_through_the_proxy_across_rotations(
    kmock: kmock.KubernetesEmulator, pg: Any, make_proxy: Callable[..., ProxyHandle], tmp_path: Path,
) -> None:
    advertise(kmock)
    k = client_for(kmock)
    creds = tmp_path / "credentials"
    script = tmp_path / "rotation.sql"
    script.write_text(SCRIPT)
    await k.create(kube.path("v1", "secrets", NS), admin_secret(pg))
    kubelet = Kubelet(k, "live-pgwarden-credentials", creds)
    body = connection(pg, name="live", grantRoles=["shop_reader", "shop_writer"])
    feeder = asyncio.create_task(kubelet.run())
    reports_c: list[tuple[int, str]] = []
    reports_s: list[tuple[int, str]] = []
    try:
        async with operator(kmock, SETTINGS):
            await k.create(kube.path(PGW, "databaseconnections", NS), body)
            await eventually(lambda: _async((creds / "password").exists()), what="credentials mounted")
            proxy = await asyncio.to_thread(make_proxy, proxy_spec={"upstream": {"credentialsDir": str(creds)}})

            # a long-lived session, opened on the first role: it outlives that role's grace period
            held = await asyncio.to_thread(held_session, proxy)
            assert await asyncio.to_thread(current_user, held) == "pgw_live_a"

            done = asyncio.Event()
            loops = [
                asyncio.create_task(pgbench_loop(proxy, script, ["-C"], 3, done, reports_c)),
                asyncio.create_task(pgbench_loop(proxy, script, [], 2, done, reports_s)),
            ]

            async def rotated_and_retired() -> bool:
                if len(kubelet.seen) < ROTATIONS + 1:
                    return False
                last = kubelet.seen[ROTATIONS]
                other = "pgw_live_b" if last["username"] == "pgw_live_a" else "pgw_live_a"
                return not (await asyncio.to_thread(role_state, pg, "pgw_live"))[other][0]

            await eventually(rotated_and_retired, timeout=20 + ROTATIONS * 12, interval=0.3,
                             what=f"{ROTATIONS} rotations and the last retire")
            done.set()
            await asyncio.gather(*loops)

            # the long-lived session met the first retire: the server's FATAL 57P01 reached the
            # idle client unasked, then the connection closed; a reconnect gets the live role
            ended = await asyncio.to_thread(held.read_error)
            assert (ended["S"], ended["C"]) == ("FATAL", "57P01"), ended
            assert "terminating connection due to administrator command" in ended["M"]
            assert await asyncio.to_thread(held.at_eof)
            held.close()
            fresh = await asyncio.to_thread(held_session, proxy)
            assert await asyncio.to_thread(current_user, fresh) == kubelet.seen[-1]["username"]
            fresh.close()
    finally:
        # awaited, not only cancelled: the checks below use the same API client
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
    await k.close()
    k = client_for(kmock)  # a fresh client for the checks: nothing of the feeder's is left in it

    # pgbench: every run, with and without a connection per transaction, without a failure
    for name, reports in (("-C", reports_c), ("sessions", reports_s)):
        assert reports, f"pgbench {name} never ran"
        for rc, out in reports:
            assert rc == 0 and not pgbench_failures(out), f"pgbench {name} failed (exit {rc}):\n{out}"
            assert re.search(r"number of transactions actually processed: [1-9]", out), out
    # the traffic went through both rotated roles
    seen_users = pg.psql("SELECT DISTINCT payload FROM audit_scratch WHERE payload LIKE 'live:%' ORDER BY 1",
                         dbname="shop").split()
    assert seen_users == ["live:pgw_live_a", "live:pgw_live_b"]

    # the roles really rotated: versions 1..4 alternating A/B, each Secret a fresh password; only
    # the live Secret's password logs in now, the retired role cannot log in at all
    versions = [s["version"] for s in kubelet.seen]
    assert versions[: ROTATIONS + 1] == [str(v) for v in range(1, ROTATIONS + 2)]
    users = [s["username"] for s in kubelet.seen]
    assert users[: ROTATIONS + 1] == ["pgw_live_a", "pgw_live_b"] * ((ROTATIONS + 1) // 2)
    assert len({s["password"] for s in kubelet.seen}) == len(kubelet.seen)
    current = await read_secret(k, "live-pgwarden-credentials")
    assert current is not None and can_login(pg, current["username"], current["password"])
    for old in kubelet.seen[:-2]:
        assert not can_login(pg, old["username"], old["password"])
    await k.delete(kube.path(PGW, "databaseconnections", NS, "live"))
    await asyncio.to_thread(database.drop_roles, handler.parse(body), database.AdminCredentials(pg.superuser, pg.password))
    await k.close()


def test_credentials_read_never_mixes_two_versions(tmp_path: Path) -> None:
    """kubelet swaps `..data` between the reads of `username` and `password`: the proxy must
    still get a pair from one version, never the new user with the old password."""
    target = tmp_path / "credentials"
    pairs = [{"username": "pgw_x_a", "password": "pw-a"}, {"username": "pgw_x_b", "password": "pw-b"}]
    materialise(target, pairs[0], "0")
    stop = threading.Event()

    def swap() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            materialise(target, pairs[n % 2], str(n))
            time.sleep(0.001)  # a thousand swaps a second (kubelet: about one a minute)

    t = threading.Thread(target=swap)
    t.start()
    mixed: set[tuple[str, str]] = set()
    try:
        creds = UpstreamCredentials(credentials_dir=str(target))
        for _ in range(3000):
            user, pw = creds.resolve()
            if (user, pw) not in {("pgw_x_a", "pw-a"), ("pgw_x_b", "pw-b")}:
                mixed.add((user, pw))
    finally:
        stop.set()
        t.join()
    assert not mixed


async def _async(value: Any) -> Any:
    return value
