"""The asyncio shell: accept clients, run the handshake, connect upstream, drive the Relay.

One `ProxyServer` per process. Every failure in one session (bad bytes, auth failure, upstream
gone) ends that session only, with an ErrorResponse that says what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pgwarden.audit import records
from pgwarden.compiled import build_of
from pgwarden.errors import (
    AgentError,
    AuthenticationFailed,
    AuthorizationFailed,
    LockedOut,
    ProtocolViolation,
    UpstreamUnavailable,
)
from pgwarden.identity.workload import is_loopback
from pgwarden.proxy import messages as m
from pgwarden.proxy import relay as relay_module
from pgwarden.proxy import upstream as up
from pgwarden.proxy.auth import TokenAuthenticator, authenticate, pod_identity
from pgwarden.proxy.config import FORWARDED_STARTUP_PARAMS, ProxyConfig
from pgwarden.proxy.pump import Pump
from pgwarden.proxy.relay import Relay, Verdict
from pgwarden.proxy.reload import ReloadStatus
from pgwarden.proxy.sessioninfo import SessionHooks, SessionInfo
from pgwarden.proxy.wire import ConnectionClosed, Endpoint
from pgwarden.subjects import Workload
from pgwarden.times import iso

log = logging.getLogger("pgwarden.proxy")

_session_ids = itertools.count(1)


@dataclass
class _Live:
    relay: Relay | None = None
    held: asyncio.Future[Verdict] | None = None
    upstream: up.UpstreamSession | None = None
    client: Endpoint | None = None
    info: SessionInfo | None = None


@dataclass
class ProxyServer:
    config: ProxyConfig
    hooks: SessionHooks | None = None
    token_auth: TokenAuthenticator | None = None
    # audit log, failure back-off and workload identity (pgwarden.proxy.gate.Runtime)
    runtime: Any = None
    _server: asyncio.Server | None = None
    _live: dict[tuple[int, int], _Live] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    draining: bool = False
    reload_status: ReloadStatus = field(default_factory=ReloadStatus)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def active_sessions(self) -> int:
        return len(self._live)

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_enabled:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.config.tls_cert_file, self.config.tls_key_file)
        return ctx

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tls = self._tls_context()
        self._server = await loop.create_server(
            self._make_endpoint, self.config.listen_host, self.config.listen_port, reuse_address=True
        )
        log.info("pgwarden proxy listening on %s:%s (hot path: %s)", self.config.listen_host, self.port,
                 build_of(relay_module))

    def _make_endpoint(self) -> Endpoint:
        ep = Endpoint()
        task = asyncio.get_running_loop().create_task(self._serve(ep))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return ep

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting; let statements in flight finish (up to the timeout); close the rest."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + (self.config.drain_timeout if timeout is None else timeout)
        while time.monotonic() < deadline and any(
            lv.relay is not None and lv.relay.busy for lv in self._live.values()
        ):
            await asyncio.sleep(0.05)
        # What outlives the timeout is cancelled, not left running in the database after we go;
        # its client hears why from us, not as a cancel "due to user request".
        cut = [
            lv.upstream for lv in self._live.values()
            if lv.relay is not None and lv.relay.busy and lv.upstream is not None
        ]
        for u in cut:
            u.endpoint.on_data = _discard
        for lv in list(self._live.values()):
            if lv.client is not None:
                lv.client.write(
                    m.error_response(
                        "57P01", "pgwarden proxy is shutting down", severity="FATAL",
                        hint="Reconnect; a new proxy instance will serve you.",
                    )
                )
                lv.client.close()
        if cut:
            await asyncio.gather(*(up.send_cancel(self.config, u.pid, u.secret) for u in cut), return_exceptions=True)
        for lv in list(self._live.values()):
            if lv.upstream is not None:
                lv.upstream.endpoint.close()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def close_ungated(self, reason: str) -> None:
        """End sessions that run without a policy gate (after a configuration change)."""
        from pgwarden.proxy.gate import SessionGate

        for lv in list(self._live.values()):
            if lv.relay is not None and not isinstance(lv.relay.gate, SessionGate) and lv.client is not None:
                lv.client.write(m.error_response("57P01", f"pgwarden: {reason}", severity="FATAL"))
                lv.client.close()

    async def close(self) -> None:
        await self.drain(timeout=0)

    # -- one client ----------------------------------------------------------------------------
    async def _serve(self, ep: Endpoint) -> None:
        await asyncio.sleep(0)  # let connection_made run
        key: tuple[int, int] | None = None
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                startup = await self._startup(ep)
                if startup is None:
                    return
                info, upstream = await self._login(ep, startup)
            key = self._register(ep, upstream, info)
            await self._relay(ep, upstream, info, key)
        except AgentError as e:
            ep.write(m.error_response_from(e))
            ep.close()
        except m.FrameError as e:
            ep.write(m.error_response_from(ProtocolViolation(f"invalid startup message: {e}")))
            ep.close()
        except TimeoutError:
            ep.write(m.error_response("08P01", "pgwarden: the connection handshake took too long", severity="FATAL"))
            ep.close()
        except (ConnectionClosed, ConnectionError, ssl.SSLError):
            ep.close()
        except asyncio.CancelledError:
            ep.close()
            raise
        except Exception:  # a bug must end this session, never the process
            log.exception("session failed")
            ep.write(m.error_response("XX000", "pgwarden internal error; the session was closed", severity="FATAL"))
            ep.close()
        finally:
            if key is not None:
                lv = self._live.pop(key, None)
                if lv is not None and lv.upstream is not None:
                    lv.upstream.endpoint.close()

    async def _startup(self, ep: Endpoint) -> m.StartupPacket | None:
        while True:
            pkt = m.parse_startup(await ep.read_startup(self.config.max_startup_bytes))
            if pkt.code == m.SSL_REQUEST:
                if self._tls is None:
                    ep.write(b"N")
                    continue
                if ep.buf:
                    raise ProtocolViolation("unencrypted bytes were sent after the SSLRequest")
                ep.write(b"S")
                await ep.start_tls(self._tls, server_side=True)
                continue
            if pkt.code == m.GSSENC_REQUEST:
                ep.write(b"N")
                continue
            if pkt.code == m.CANCEL_REQUEST:
                await self._cancel(pkt.pid, pkt.secret)
                ep.close()
                return None
            options = [k for k in pkt.params if k.startswith("_pq_.")]
            if pkt.code != m.PROTOCOL_3 or options:  # a newer client: it falls back to 3.0
                ep.write(m.negotiate_protocol_version(options))
            return pkt

    async def _login(self, ep: Endpoint, startup: m.StartupPacket) -> tuple[SessionInfo, up.UpstreamSession]:
        params = startup.params
        db = params.get("database") or params.get("user", "")
        conn = self.config.connection
        if db not in (conn.database, conn.name):
            raise AuthorizationFailed(
                f'database "{db}" is not served by this proxy',
                hint=f"Connect with dbname={conn.database}.",
                sqlstate="3D000",
            )
        peer = _peer(ep)
        loopback = is_loopback(peer)  # the sidecar case: the agent's own pod
        tls = ep.transport is not None and ep.transport.get_extra_info("sslcontext") is not None
        rt = self.runtime
        ainfo = records.SessionInfo(
            session_id=f"{int(time.time())}-{next(_session_ids)}-{secrets.token_hex(3)}",
            workload=rt.workload if rt is not None else Workload(),
            connection=f"{conn.namespace}/{conn.name}",
            database=conn.database,
            application_name=params.get("application_name", ""),
            client=peer,
            user=params.get("user", ""),
        )
        source = peer.rsplit(":", 1)[0]
        backoff = rt.backoff if rt is not None else None
        attempt = None
        try:
            if backoff is not None:  # a limit, not a sleep: refused before the password is looked at
                attempt = await backoff.begin(source, params.get("user", ""))
            pod = pod_identity(ainfo.workload) if self.config.pod_identity and loopback else None
            identity = await authenticate(
                ep, params, {u.name: u for u in self.config.users}, self.token_auth, secure_channel=tls or loopback, pod=pod
            )
        except AuthenticationFailed as e:
            next_delay = backoff.failed(attempt, time.monotonic()) if backoff is not None and attempt else 0.0
            if rt is not None and rt.audit is not None:
                with contextlib.suppress(AgentError):  # refused either way; written before the answer
                    await rt.audit.write(records.auth_failure(ainfo, reason=e.message, method="password", delay_s=next_delay))
            raise
        else:
            if backoff is not None and attempt is not None:
                backoff.succeeded(attempt)
        finally:
            if backoff is not None and attempt is not None:
                backoff.end(attempt)
        ainfo = ainfo.with_identity(identity)
        if rt is not None and rt.breaker is not None:
            await _refuse_if_locked_out(rt, ainfo, identity.subject)
        if rt is not None and rt.audit is not None:
            await rt.audit.write(records.session_start(ainfo, tls=tls))
        forwarded = {k: v for k, v in params.items() if k in FORWARDED_STARTUP_PARAMS}
        pinned = rt.upstream_settings(identity) if rt is not None else {}
        upstream = await up.connect(self.config, {**forwarded, **pinned})
        info = SessionInfo(
            id=ainfo.session_id,
            identity=identity,
            peer=peer,
            application_name=params.get("application_name", ""),
            started=time.time(),
            params=forwarded,
            audit=ainfo,
            server_version=upstream.server_version,
        )
        return info, upstream

    def _register(self, ep: Endpoint, upstream: up.UpstreamSession, info: SessionInfo) -> tuple[int, int]:
        while True:
            key = (secrets.randbits(31), secrets.randbits(32))
            if key not in self._live:
                break
        self._live[key] = _Live(upstream=upstream, client=ep, info=info)
        return key

    async def _relay(self, ep: Endpoint, upstream: up.UpstreamSession, info: SessionInfo, key: tuple[int, int]) -> None:
        uep = upstream.endpoint
        hello = [m.auth_request(m.AUTH_OK)]
        hello += [m.parameter_status(k, v) for k, v in upstream.parameters]
        hello.append(m.backend_key_data(*key))
        hello.append(m.ready_for_query(b"I"))
        gate, observer = self.hooks(info, ep.write) if self.hooks is not None else (None, None)
        relay = Relay(uep.write, ep.write, gate=gate, observer=observer, max_message_bytes=self.config.max_message_bytes,
                      max_statement_bytes=self.config.max_statement_bytes)
        def limit_cancel() -> None:
            """A result passed maxRows: cancel it. PostgreSQL delivers a cancel asynchronously and
            ignores one that reaches an idle backend, so the client's next statement is held
            until the cancel has been delivered, or the cancel could hit that statement instead."""
            relay.pause_client()

            async def cancel_then_resume() -> None:
                try:
                    await up.send_cancel(self.config, upstream.pid, upstream.secret)
                finally:
                    # the absorber takes a late cancel; the client is released after its answer
                    if not relay.absorb_cancel():  # rare: an extended batch is open; release now
                        release()

            def release() -> None:
                try:
                    waiting = relay.unpause_client()
                except Exception as e:
                    fail(e)
                    return
                if waiting is not None:
                    self._hold(relay, waiting, ep, finish, self._live.get(key))

            relay.on_absorbed = release

            task = asyncio.get_running_loop().create_task(cancel_then_resume())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        relay.on_limit = limit_cancel
        self._live[key].relay = relay
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def finish(reason: str) -> None:
            if not done.done():
                done.set_result(reason)

        def fail(e: Exception) -> None:
            _end_session(ep, finish, e)

        def hold(waiting: Awaitable[Verdict]) -> None:
            self._hold(relay, waiting, ep, finish, self._live.get(key))

        pump = Pump(relay, hold, fail, finish)  # compiled: every chunk goes through it
        on_client, on_server = pump.client, pump.server

        # back-pressure: a slow client stops us reading the server, and vice versa
        ep.on_pause_writing = lambda: uep.transport.pause_reading() if uep.transport else None
        ep.on_resume_writing = lambda: uep.transport.resume_reading() if uep.transport else None
        uep.on_pause_writing = lambda: ep.transport.pause_reading() if ep.transport else None
        uep.on_resume_writing = lambda: ep.transport.resume_reading() if ep.transport else None
        ep.on_lost = lambda exc: finish("client")
        uep.on_lost = lambda exc: finish("upstream")
        ep.write(b"".join(hello))
        uep.on_data = on_server
        ep.on_data = on_client
        leftover = uep.take_buffer()
        if leftover:
            on_server(leftover)
        leftover = ep.take_buffer()
        if leftover:
            on_client(leftover)
        if ep.closed:
            finish("client")
        if uep.closed:
            finish("upstream")
        try:
            reason = await done
        finally:  # also when the proxy shuts down under this session: close its recording
            if observer is not None:
                observer.session_end(done.result() if done.done() else "proxy shutdown")
        if reason == "client" and relay.busy:
            # the client vanished mid-query: stop the work it left behind
            await up.send_cancel(self.config, upstream.pid, upstream.secret)
        if reason == "upstream" and not ep.closed and not relay.server_fatal:
            ep.write(
                m.error_response_from(
                    UpstreamUnavailable(
                        "the connection to the database was lost",
                        hint="The database may have restarted; reconnect and retry.",
                    )
                )
            )
        uep.close()
        ep.close()

    def _hold(self, relay: Relay, waiting: Any, ep: Endpoint, finish: Callable[[str], None], live: _Live | None = None) -> None:
        """A statement is held (approval, durable audit): read nothing more until it resolves."""
        if ep.transport is not None:
            ep.transport.pause_reading()

        def resolved(fut: asyncio.Future[Verdict]) -> None:
            if live is not None:
                live.held = None
            if fut.cancelled():  # the client's CancelRequest withdrew the held statement
                exc: BaseException | None = AgentError(
                    "canceling statement due to user request; nothing was forwarded", sqlstate="57014"
                )
            else:
                exc = fut.exception()
            if exc is None:
                verdict = fut.result()
            elif isinstance(exc, AgentError):
                verdict = Verdict(error=exc)
            else:  # fail closed: the held statement is refused, the session goes on
                log.error("held statement failed: %r", exc)
                verdict = Verdict(error=AgentError("pgwarden internal error while holding the statement; nothing was forwarded"))
            try:
                again = relay.resume(verdict)
            except Exception as e:  # never leave the client paused behind a failed callback
                _end_session(ep, finish, e)
                return
            if again is not None:
                self._hold(relay, again, ep, finish, live)
            elif ep.transport is not None and not ep.closed:
                ep.transport.resume_reading()
            if relay.terminated:
                finish("terminate")

        fut = asyncio.ensure_future(waiting)
        if live is not None:
            live.held = fut
        fut.add_done_callback(resolved)

    async def _cancel(self, pid: int, secret: int) -> None:
        lv = self._live.get((pid, secret))
        if lv is None or lv.upstream is None:
            return  # as PostgreSQL does: no answer either way
        # a statement waiting for approval or audit: withdraw it (a guarded write in flight is
        # running on the server: cancel it there, and the guard undoes what it did)
        if lv.held is not None and not (lv.relay is not None and lv.relay.guarding):
            lv.held.cancel()
            return
        await up.send_cancel(self.config, lv.upstream.pid, lv.upstream.secret)


async def _refuse_if_locked_out(rt: Any, ainfo: records.SessionInfo, subject: str) -> None:
    """limits.maxDenials: an identity locked out on this proxy gets no session until the lockout
    ends or a person lifts it (`pgwarden lockouts lift`); lifts go into the audit chain first."""
    breaker = rt.breaker
    assert breaker is not None
    for lk in breaker.take_lifts():
        if rt.audit is not None:
            rec = ainfo.base("lockout.end")
            rec.update(lockout={"subject": lk.subject, "until": iso(lk.until),
                                **({"liftedBy": lk.lifted_by, "liftedAt": iso(lk.lifted_at)}
                                   if lk.lifted_by else {"expired": True})})
            rt.audit.emit(rec)
    lk = breaker.locked(subject)
    if lk is None:
        return
    err = LockedOut(
        f"pgwarden refuses a session to {subject}: locked out of this proxy until {iso(lk.until)} "
        f"after {lk.refused} refused statements (limits.maxDenials)",
        hint="Whoever runs this proxy can lift it early: pgwarden lockouts lift SUBJECT --state "
             f"{breaker.path} (in a cluster, from the pgwarden-proxy container).",
    )
    if rt.audit is not None:
        with contextlib.suppress(AgentError):  # refused either way; written before the answer
            await rt.audit.write(records.auth_failure(ainfo, reason=err.message, method="lockout", delay_s=0.0))
    raise err


def _end_session(ep: Endpoint, finish: Callable[[str], None], e: Exception) -> None:
    """A failure on the data path ends this session, with a reason, never the process."""
    if isinstance(e, AgentError):
        ep.write(m.error_response_from(e))
        finish("protocol")
    else:
        log.error("relay failed; closing the session", exc_info=e)
        ep.write(m.error_response("XX000", "pgwarden internal error; the session was closed", severity="FATAL"))
        finish("error")


def _discard(data: bytes) -> None:
    pass


def _peer(ep: Endpoint) -> str:
    if ep.transport is None:
        return ""
    addr = ep.transport.get_extra_info("peername")
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return "unix" if addr is not None else ""  # a unix socket's peer name is ''

