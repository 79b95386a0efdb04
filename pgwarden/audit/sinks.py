"""Copies of the durable audit records for outside systems: stdout (cluster logging).

A sink must never slow the writer: the stdout sink hands lines to its own thread through a
bounded queue and counts what it had to drop when stdout is slower than the proxy.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any

from pgwarden.audit.config import AuditConfig


class StdoutSink:
    """Prints each sealed line (with its hash: the log collector becomes a witness of the chain)."""

    def __init__(self, stream: IO[bytes] | None = None, *, max_queue: int = 10_000) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=max_queue)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="pgwarden-audit-stdout", daemon=True)
        self._thread.start()

    def publish(self, lines: Sequence[bytes], records: Sequence[dict[str, Any]]) -> None:
        try:
            self._queue.put_nowait(b"".join(lines))
        except queue.Full:
            self.dropped += len(lines)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._stream.write(item)
                self._stream.flush()
            except (OSError, ValueError):
                self.dropped += item.count(b"\n")

    def close(self) -> None:
        try:
            self._queue.put(None, timeout=1.0)
        except queue.Full:
            return
        self._thread.join(timeout=2.0)


def build_sinks(config: AuditConfig) -> list[Any]:
    """The extra sinks `audit:` asks for (stdout, otel); the JSON-lines file is always on."""
    sinks: list[Any] = []
    if config.stdout:
        sinks.append(StdoutSink())
    if config.otel:
        from pgwarden.audit.otel import OtelSink

        otel = OtelSink.from_env()
        if otel is not None:
            sinks.append(otel)
    return sinks
