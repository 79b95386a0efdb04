"""The per-session bytes pump: what the two endpoints call for every chunk they read.

`Endpoint.data_received` calls `client` or `server` for each chunk; they hand it to the relay and
act on what it says (a held statement, a terminated session, an exception that ends the
session). One object owns that, compiled with the relay (pgwarden/compiled.py), so a chunk goes
from the event loop to the relay without an interpreted Python frame in between: as closures in
the server's session coroutine they cost an interpreted call per chunk, two per statement.

What happens on the rare paths (holding a statement, ending the session) stays with the server,
which hands those in as callables.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pgwarden.proxy.relay import Relay, Verdict


class Pump:
    def __init__(self, relay: Relay, hold: Callable[[Awaitable[Verdict]], None],
                 fail: Callable[[Exception], None], finish: Callable[[str], None]) -> None:
        self.relay = relay
        self.hold = hold        # a statement waits (approval, durable audit): stop reading until it resolves
        self.fail = fail        # the relay raised: end the session (nothing more is forwarded)
        self.finish = finish    # the session is over, with this reason

    def client(self, data: bytes) -> None:
        relay = self.relay
        try:
            waiting = relay.client_data(data)
        except Exception as e:
            self.fail(e)
            return
        if waiting is not None:
            self.hold(waiting)
        if relay.terminated:
            self.finish("terminate")

    def server(self, data: bytes) -> None:
        try:
            self.relay.server_data(data)
        except Exception as e:
            self.fail(e)
