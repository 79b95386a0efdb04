"""An asyncio Protocol for one side of a PostgreSQL connection.

During the handshake it buffers bytes and offers awaitable reads; after it the relay takes
over `on_data` and bytes go straight through (asyncio Protocols, not streams: streams cost a
task switch and a copy per chunk, which the measurements in docs/benchmarks.md show the proxy cannot afford).
Flow control links the two sides: when one side's write buffer fills up, the other side stops
reading, so a 1,000,000-row result never piles up in the proxy's memory.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from pgwarden.proxy import messages as m


class ConnectionClosed(Exception):
    """The peer closed the connection."""


class Endpoint(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.on_data: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[Exception | None], None] | None = None
        # called when our write buffer is full / drained: the relay pauses the other side
        self.on_pause_writing: Callable[[], None] | None = None
        self.on_resume_writing: Callable[[], None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.lost_exc: Exception | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
            return
        self.buf += data
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost_exc = exc
        self._wake()
        if self.on_lost is not None:
            self.on_lost(exc)

    def pause_writing(self) -> None:
        if self.on_pause_writing is not None:
            self.on_pause_writing()

    def resume_writing(self) -> None:
        if self.on_resume_writing is not None:
            self.on_resume_writing()

    # -- handshake helpers ----------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _need(self, n: int) -> None:
        while len(self.buf) < n:
            if self.closed:
                raise ConnectionClosed("connection closed by the peer")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read_startup(self, limit: int) -> bytes:
        """An untyped startup packet (SSLRequest, CancelRequest, StartupMessage)."""
        await self._need(4)
        length = m.startup_length(self.buf)
        assert length is not None
        if length < 8 or length > limit:
            raise m.FrameError(f"startup packet length {length} out of range")
        await self._need(length)
        pkt = bytes(self.buf[:length])
        del self.buf[:length]
        return pkt

    async def read_message(self, limit: int) -> tuple[bytes, bytes]:
        """One typed message: (type byte, payload)."""
        await self._need(5)
        kind = bytes(self.buf[0:1])
        length = m.U32.unpack_from(self.buf, 1)[0]
        if length < 4 or length > limit:
            raise m.FrameError(f"message length {length} out of range")
        await self._need(1 + length)
        payload = bytes(self.buf[5 : 1 + length])
        del self.buf[: 1 + length]
        return kind, payload

    async def read_byte(self) -> bytes:
        await self._need(1)
        b = bytes(self.buf[:1])
        del self.buf[:1]
        return b

    def take_buffer(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data

    # -- output ---------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not self.closed:
            t.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def start_tls(self, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        new = await loop.start_tls(
            self.transport, self, ctx, server_side=server_side, server_hostname=server_hostname
        )
        if new is None:
            raise ConnectionClosed("TLS handshake failed: the connection closed")
        self.transport = new
