"""AuditLog: fail-closed, group-committed, hash-chained audit records.

`await write(record)` returns only after the record is durable as `audit.durability` says:
`write` (the default) — written to the kernel, so it survives the proxy being killed, and
fsynced with everything else written in the last `syncInterval`; `fsync` — on disk (write +
fsync) before the statement is forwarded, so it survives the node crashing too. Many concurrent
writers share one write (and one fsync): while the writer thread handles one batch, new records
gather into the next. If the batch cannot be written, every waiter gets `AuditUnavailable`
(PW004) and the proxy forwards nothing; the file is cut back to the last acknowledged record, so
the chain stays intact. A failed background fsync fails every later write until the proxy
restarts: records the kernel may have lost are never followed by statements forwarded as if they
were kept (a later fsync's success says nothing about pages the kernel dropped after a failure).

A record handed to `write` or `emit` is the log's from then on: it is sealed in place (`seq` and
`prev` are set in it), so build a new one for every call. A record is a dict, or the native body
of one (records.statement_record / outcome_record: its canonical JSON, built in C), which the
sealing step puts in the chain the same way and the sinks get back as a dict.

`emit(record)` joins the same chain and order but nobody waits for it: outcome and session-end
records, where failing the client would help no one. Lost emits are counted.

With `durability: fsync` sealing (seq, prev, hash), writing and fsyncing happen on the writer
thread in the order records were handed in. With `durability: write` a record is sealed and
written on the event loop itself (`write_now`): a write of a few hundred bytes to the page cache
costs microseconds, where handing it to a thread and back cost a GIL switch (up to 5 ms under
load) on every statement; only the periodic fsync runs on the writer thread. Either way the
chain order is the call order on the event loop. Sinks (stdout, OpenTelemetry) see only records
that are already acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import orjson

from pgwarden.audit.chain import GENESIS, rotation_marker, seal_all, seal_block
from pgwarden.audit.config import AuditConfig
from pgwarden.audit.filesink import RotatingFile
from pgwarden.audit.records import Record, now_iso
from pgwarden.errors import AuditUnavailable

log = logging.getLogger(__name__)

# How long an emitted record (a statement's outcome, a session's end) may wait for the next
# statement's record to share its write(2); under load it almost always does
EMIT_DELAY = 0.005


class Sink(Protocol):
    """Gets durable records, on the audit writer thread; must not block (buffer and drop instead)."""

    def publish(self, lines: Sequence[bytes], records: Sequence[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


@dataclass
class AuditStats:
    records: int = 0
    batches: int = 0
    failed_batches: int = 0
    lost_emits: int = 0
    largest_batch: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)  # not __dict__: compiled (mypyc), the class has none


def _sealed_record(line: bytes) -> dict[str, Any]:
    """The record a sealed line holds, as the sinks got it before it was sealed: without `hash`."""
    record: dict[str, Any] = orjson.loads(line)
    record.pop("hash", None)
    return record


def _unavailable(path: str, why: str) -> AuditUnavailable:
    return AuditUnavailable(
        f"the audit log {path} cannot be written ({why}); the statement was not forwarded",
        hint="Ask the operator to fix the audit sink (disk space, permissions, volume); then retry.",
    )


class AuditLog:
    """One per proxy process. Call `await open()` at startup and `await close()` at shutdown."""

    def __init__(self, config: AuditConfig, *, sinks: Sequence[Sink] = (),
                 fsync: Callable[[int], None] = os.fsync) -> None:
        self.config = config
        self.sinks = list(sinks)
        self.file = RotatingFile(config.path, rotate_bytes=config.rotate_bytes, keep=config.keep, fsync=fsync)
        self.stats = AuditStats()
        self._pending: list[tuple[Record, asyncio.Future[None] | None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgwarden-audit")
        self._seq = 0
        self._prev = GENESIS
        self._closed = False
        self.last_error = ""
        self._group_sync = config.durability == "write"
        self._dirty = False  # written since the last fsync (writer thread)
        self._sync_error = ""  # the last background fsync failed: writes fail closed until one works
        self._syncer: asyncio.Task[None] | None = None
        # durability: write — records are written on the loop; emits wait here for the next write
        # or the next loop iteration; the lock keeps a rotation or close off an fd being fsynced
        self.inline = self._group_sync
        self._emits: list[Record] = []
        self._emit_scheduled = False
        self._io_lock = threading.Lock()

    @property
    def fsyncs(self) -> int:
        return self.file.fsyncs

    async def open(self) -> bool:
        """Open the file and pick up the chain where it ended. False (and logged) if unwritable:
        the proxy may still start; every statement then fails with PW004 until the path works."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._open_sync)
        except OSError as e:
            self.last_error = e.strerror or str(e)
            log.error("audit log %s cannot be opened: %s; statements will fail with PW004", self.config.path,
                      self.last_error)
            return False
        finally:
            if self._group_sync and self._syncer is None:
                self._syncer = loop.create_task(self._sync_loop())
        return True

    async def _sync_loop(self) -> None:
        """durability: write — fsync what was written, every sync_interval, on the writer thread."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(self.config.sync_interval)
            try:
                await loop.run_in_executor(self._executor, self._sync_dirty)
            except Exception as e:
                why = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
                if not self._sync_error:
                    log.error("audit log %s: fsync failed (%s); statements fail with PW004 until the proxy "
                              "restarts", self.config.path, why)
                # for good: after a failed fsync the kernel may drop the pages it could not write and
                # report the next fsync clean, so a later success proves nothing about the records
                # acknowledged before it. A restart re-reads the file's tail and chains from what is there.
                self._sync_error = self.last_error = why

    def write_now(self, record: Record) -> None:
        """durability: write — seal and write `record` now, on the calling (event loop) thread;
        it is in the kernel when this returns. Raises AuditUnavailable (PW004) if it cannot be."""
        if self._closed:
            raise _unavailable(self.config.path, "the audit log is closed")
        if self._sync_error:
            raise _unavailable(self.config.path, f"fsync failed: {self._sync_error}")
        batch, self._emits = self._emits, []
        batch.append(self._stamp(record))
        try:
            self._append(batch)
        except Exception as e:
            self._failed(batch[:-1], e)
            raise _unavailable(self.config.path, self.last_error) from e

    def _failed(self, emits: list[Record], e: Exception) -> None:
        self.stats.failed_batches += 1
        self.stats.lost_emits += len(emits)
        why = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
        self.last_error = why
        log.error("audit batch of %d records not written: %s", len(emits) + 1, why)

    def _flush_emits(self) -> None:
        self._emit_scheduled = False
        if not self._emits or self._closed:
            return
        batch, self._emits = self._emits, []
        if self._sync_error:
            self.stats.lost_emits += len(batch)
            return
        try:
            self._append(batch)
        except Exception as e:
            self._failed(batch[:-1], e)
            self.stats.lost_emits += 1

    async def write(self, record: Record) -> None:
        """Durably append `record`; raises AuditUnavailable (PW004) if it cannot be."""
        if self.inline:
            self.write_now(record)
            return
        if self._closed:
            raise _unavailable(self.config.path, "the audit log is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((self._stamp(record), fut))
        self._kick()
        # a plain timer rather than wait_for(shield()): this runs once per statement
        timer = loop.call_later(self.config.write_timeout, self._time_out, fut)
        try:
            await fut
        finally:
            timer.cancel()

    def _time_out(self, fut: asyncio.Future[None]) -> None:
        """The disk did not answer in time: fail the statement; the record may still land later."""
        if not fut.done():
            fut.set_exception(_unavailable(self.config.path, f"no fsync within {self.config.write_timeout:g}s"))

    def emit(self, record: Record) -> None:
        """Append `record` in order without waiting; never raises."""
        if self._closed:
            self.stats.lost_emits += 1
            return
        if self.inline:
            self._emits.append(self._stamp(record))
            if not self._emit_scheduled:
                # the next statement's record takes them along (one write for both); a quiet
                # session has them written within EMIT_DELAY
                self._emit_scheduled = True
                asyncio.get_running_loop().call_later(EMIT_DELAY, self._flush_emits)
            return
        self._pending.append((self._stamp(record), None))
        self._kick()

    async def flush(self) -> None:
        """Wait until everything handed in so far was attempted (tests, shutdown)."""
        self._flush_emits()
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def close(self) -> None:
        await self.flush()
        self._closed = True
        if self._syncer is not None:
            self._syncer.cancel()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_sync)
        self._executor.shutdown(wait=True)

    # --- event loop side ---------------------------------------------------------------------

    @staticmethod
    def _stamp(record: Record) -> Record:
        if isinstance(record, dict) and "time" not in record:  # a native body has its time
            record = {"time": now_iso(), **record}
        return record

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            records = [r for r, _ in batch]
            try:
                await loop.run_in_executor(self._executor, self._commit_sync, records)
            except Exception as e:  # OSError mostly; anything else must fail closed just the same
                self.stats.failed_batches += 1
                why = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
                self.last_error = why
                log.error("audit batch of %d records not written: %s", len(batch), why)
                err = _unavailable(self.config.path, why)
                for _, fut in batch:
                    if fut is None:
                        self.stats.lost_emits += 1
                    elif not fut.done():
                        fut.set_exception(err)
                continue
            for _, fut in batch:
                if fut is not None and not fut.done():
                    fut.set_result(None)

    # --- writer thread -----------------------------------------------------------------------

    def _open_sync(self) -> None:
        link = self.file.open()
        if self.file.recovered_bytes:
            log.warning("audit log %s ended in a torn record (%d bytes), cut off", self.config.path,
                        self.file.recovered_bytes)
        if link is not None:
            self._seq, self._prev = link[0] + 1, link[1]

    def _append(self, records: list[Record]) -> None:
        """durability: write — seal and write on the calling thread; no fsync (the syncer's)."""
        self._commit_sync(records)

    def _commit_sync(self, records: list[Record]) -> None:
        # opening, rotating and closing take the lock: never under the syncer's fsync of that fd
        if not self.file.is_open:
            with self._file_lock():
                self._open_sync()
        data, lines, prev = self._seal(records)
        if self.file.size and self.file.size + len(data) > self.file.rotate_bytes:
            with self._file_lock():
                self.file.make_room(len(data))
        if self.file.size == 0 and self._seq > 0:
            # a file that continues the chain starts with a marker: rotation, not deletion, explains
            # the records before it (also after a crash between rotating and writing)
            marker = rotation_marker(now_iso(), rotated_files=self.file.rotated_files(), keep=self.file.keep)
            records = [marker, *records]
            data, lines, prev = self._seal(records)
        seq = self._seq + len(records)
        start = self.file.size
        try:
            self.file.write(data)
            if self._group_sync:
                self._dirty = True
            else:
                self.file.sync()
        except OSError:
            try:
                if self.file.size != start:
                    self.file.truncate(start)
            except OSError:
                with self._file_lock():
                    self.file.close()  # reopened (and its tail re-read) on the next batch
            raise
        self._seq, self._prev = seq, prev
        self.stats.records += len(records)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(records))
        if not self.sinks:
            return
        # the sinks read records: a native body's is its line, parsed (`seq` and `prev` included,
        # as sealing set them in a dict record)
        dicts = [r if isinstance(r, dict) else _sealed_record(line) for r, line in zip(records, lines, strict=True)]
        for sink in self.sinks:
            try:
                sink.publish(lines, dicts)
            except Exception:
                log.exception("audit sink %s failed", type(sink).__name__)

    def _seal(self, records: list[Record]) -> tuple[bytes, list[bytes], str]:
        """The records' lines as one block, the lines one by one (for the sinks; empty when
        sealed as a block, which only happens without sinks), and the last hash."""
        if not self.sinks:
            block = seal_block(records, self._seq, self._prev)
            if block is not None:
                return block[0], [], block[1]
        lines, prev = seal_all(records, self._seq, self._prev, owned=True)  # write()/emit() hand them over
        return b"".join(lines), lines, prev

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """The lock an fsync holds, for opening, rotating or closing the file — bounded, since with
        durability: write this runs on the event loop: a disk stuck in fsync fails the statement
        (PW004) instead of freezing every session."""
        if not self._io_lock.acquire(timeout=self.config.write_timeout):
            raise OSError(errno.ETIMEDOUT, f"the disk did not finish an fsync within {self.config.write_timeout:g}s")
        try:
            yield
        finally:
            self._io_lock.release()

    def _sync_dirty(self) -> None:
        with self._io_lock:
            if self._dirty and self.file.is_open:
                self._dirty = False  # before the fsync: a write during it is synced next time
                try:
                    self.file.sync()
                except OSError:
                    self._dirty = True
                    raise

    def _close_sync(self) -> None:
        try:
            with self._io_lock:
                self.file.close()
        finally:
            for sink in self.sinks:
                try:
                    sink.close()
                except Exception:
                    log.exception("closing audit sink %s failed", type(sink).__name__)
