"""The local approval queue: one SQLite file shared by the proxy and `pgwarden approvals`.

For standalone use and the demo. The decision comes from another process (the CLI), so the file
is in WAL mode (readers never block the writer) with a busy timeout, and every decision is one
`BEGIN IMMEDIATE` transaction: two reviewers approving at once are serialised, and a decision
racing with expiry or withdrawal sees the other's result. The proxy polls the row; a read of one
row by primary key costs microseconds, so a short interval is cheap.

The local backend is for development. An approver's name is self-declared (`--as NAME`), and
anyone who can write the file can approve, so: the file (and its -wal / -shm) is 0600, readable
and writable by the proxy's OS user only (0660 with `reviewerGroup`, for reviewers in that
group); the CLI refuses decisions made by the proxy's own OS user (the agent usually runs as it),
unless `allowProxyUserDecisions` says nobody else runs there (the demo); and the agent is told
which request to ask about, never the database path or the command that decides. Use the
Kubernetes backend where the approver must be authenticated.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgwarden.approvals.model import (
    APPROVED,
    DENIED,
    EXECUTED,
    EXPIRED,
    PENDING,
    WITHDRAWN,
    ApprovalError,
    ApprovalSpec,
    Change,
    Outcome,
    Preview,
    RequestView,
    Ticket,
    Vote,
    decide,
    local_agent_hint,
    local_command,
)
from pgwarden.approvals.notify import Notifier
from pgwarden.subjects import SubjectRef

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    connection TEXT NOT NULL,
    requester_subject TEXT NOT NULL,
    requester_sa TEXT NOT NULL DEFAULT '',
    requester TEXT NOT NULL,          -- JSON of Identity.as_dict()
    workload TEXT NOT NULL,           -- JSON
    statement TEXT NOT NULL,
    params TEXT NOT NULL,             -- JSON list
    statement_hash TEXT NOT NULL,
    policy TEXT NOT NULL DEFAULT '',
    rule TEXT NOT NULL,
    reviewers TEXT NOT NULL,          -- JSON list of "group:x" / "user:x" / "serviceAccount:ns/x"
    min_approvals INTEGER NOT NULL,
    mode TEXT NOT NULL,
    state TEXT NOT NULL,
    decided_by TEXT NOT NULL DEFAULT '',
    decided_at REAL,
    reason TEXT NOT NULL DEFAULT '',
    executed_at REAL,
    outcome_tag TEXT NOT NULL DEFAULT '',
    preview TEXT NOT NULL DEFAULT ''  -- JSON of Preview.to_json(); '' for none
);
CREATE INDEX IF NOT EXISTS requests_by_hash ON requests (statement_hash, state);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,             -- proxy_uid, proxy_user_may_decide: written by the proxy at start
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS votes (
    request_id TEXT NOT NULL REFERENCES requests (id),
    approver TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (request_id, approver)
);
"""


def default_db_path() -> Path:
    return Path(os.environ.get("PGWARDEN_APPROVALS_DB") or "./pgwarden-data/approvals.db")


DEV_WARNING = ("the local approval backend is for development: reviewers' names are self-declared and anyone "
               "who can write the database file can approve; use the Kubernetes backend (authenticated "
               "reviewers) for real databases")


def resolve_group(group: str | int) -> int:
    """A group name or numeric id -> gid (ValueError saying what to write instead)."""
    if isinstance(group, int) or str(group).isdigit():
        return int(group)
    try:
        return grp.getgrnam(str(group)).gr_gid
    except KeyError:
        raise ValueError(f"there is no group {group!r} on this host; create it or give a numeric group id") from None


def proxy_user_refusal(euid: int, proxy_uid: int | None, owner_uid: int, may_decide: bool) -> str | None:
    """Why the process running as `euid` may not decide, or None. The proxy's own OS user is refused:
    the agent usually runs as that user (it may read and run whatever the proxy can)."""
    if may_decide:
        return None
    if euid == proxy_uid or euid == owner_uid:
        return ("decisions made by the proxy's own OS user are refused (an agent running beside the proxy runs as "
                "it); decide as another user: a reviewer in the approvals reviewerGroup, or with sudo")
    return None


@dataclass(frozen=True)
class Row:
    """One request as the CLI lists it."""

    id: str
    created_at: float
    expires_at: float
    connection: str
    requester_subject: str
    statement: str
    params: tuple[str | None, ...]
    rule: str
    reviewers: tuple[str, ...]
    min_approvals: int
    mode: str
    state: str
    decided_by: str
    reason: str
    votes: tuple[str, ...]
    policy: str = ""
    requester: dict[str, Any] = field(default_factory=dict)  # Identity.as_dict()
    workload: dict[str, Any] = field(default_factory=dict)
    preview: Preview | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "createdAt": self.created_at, "expiresAt": self.expires_at,
            "connection": self.connection, "requester": self.requester_subject, "statement": self.statement,
            "params": list(self.params), "rule": self.rule, "reviewers": list(self.reviewers),
            "minApprovals": self.min_approvals, "mode": self.mode, "state": self.state,
            "decidedBy": self.decided_by, "reason": self.reason, "approvals": list(self.votes),
            "policy": self.policy, "requesterIdentity": self.requester, "workload": self.workload,
            "preview": self.preview.to_json() if self.preview is not None else None,
        }


def _ref(text: str) -> SubjectRef:
    kind, _, value = text.partition(":")
    return SubjectRef(group=value if kind == "group" else "", user=value if kind == "user" else "",
                      service_account=value if kind == "serviceAccount" else "")


class LocalApprovals:
    """`ApprovalBackend` over a SQLite file; also what the CLI uses to list and decide."""

    def __init__(self, path: str | Path | None = None, *, poll_interval: float = 0.2,
                 notifier: Notifier | None = None, clock: Any = time.time, reviewer_group: str | int | None = None,
                 proxy_user_may_decide: bool = False, create: bool = True) -> None:
        """`create` (the proxy's side) makes the file private and records the proxy's OS user;
        the CLI opens an existing file with `create=False`."""
        self.path = Path(path) if path is not None else default_db_path()
        self.poll_interval = poll_interval
        self.notifier = notifier
        self.clock = clock
        self.gid = resolve_group(reviewer_group) if reviewer_group not in (None, "") else None
        self.file_mode = 0o660 if self.gid is not None else 0o600
        if not create:
            try:
                found = stat.S_ISREG(os.stat(self.path).st_mode)
            except PermissionError:
                raise ApprovalError(f"cannot read the approvals database at {self.path}: permission denied. It is "
                                    "private to the proxy's OS user; reviewers are members of the group named by "
                                    "ProxyConfig approvals.reviewerGroup", 403) from None
            except OSError:
                found = False
            if not found:
                raise ApprovalError(f"no approvals database at {self.path}; pass --db or set PGWARDEN_APPROVALS_DB "
                                    "to the file the proxy uses (ProxyConfig approvals.path)", 404)
            return
        self._prepare_files()
        with self._db() as db:
            db.executescript(SCHEMA)
            columns = {r[1] for r in db.execute("PRAGMA table_info(requests)")}
            if "preview" not in columns:  # a queue file from a version without previews
                db.execute("ALTER TABLE requests ADD COLUMN preview TEXT NOT NULL DEFAULT ''")
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('proxy_uid', ?), "
                       "('proxy_user_may_decide', ?)", (str(os.geteuid()), "1" if proxy_user_may_decide else "0"))

    def _prepare_files(self) -> None:
        """The folder (if new) and the file, private before SQLite writes a byte; SQLite gives its
        -wal and -shm files the database file's mode (and, as root, its owner)."""
        folder = self.path.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, mode=0o700)
            if self.gid is not None:
                os.chown(folder, -1, self.gid)
                os.chmod(folder, 0o2770)  # setgid: the files reviewers create get the group too
        elif self.gid is not None:
            st = folder.stat()
            if st.st_gid != self.gid or not st.st_mode & stat.S_IWGRP:
                raise ValueError(f"the folder {folder} must belong to the reviewer group and be group-writable "
                                 f"(reviewers' SQLite writes its -wal / -shm files there): run "
                                 f"`chgrp {self.gid} {folder} && chmod 2770 {folder}`, or use a folder of its own")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, self.file_mode)
        try:
            if self.gid is not None:
                os.fchown(fd, -1, self.gid)
            os.fchmod(fd, self.file_mode)  # also tightens a file an older version left world-readable
        finally:
            os.close(fd)
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                if self.gid is not None:
                    os.chown(side, -1, self.gid)
                os.chmod(side, self.file_mode)

    def decider_refusal(self, euid: int | None = None) -> str | None:
        """Why this OS user may not decide (the CLI's check), or None."""
        euid = os.geteuid() if euid is None else euid
        with self._db() as db:
            meta: dict[str, str] = {}
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
                meta = {r[0]: r[1] for r in db.execute("SELECT key, value FROM meta")}
        proxy_uid = int(meta["proxy_uid"]) if meta.get("proxy_uid", "").isdigit() else None
        return proxy_user_refusal(euid, proxy_uid, self.path.stat().st_uid, meta.get("proxy_user_may_decide") == "1")

    # -- storage -------------------------------------------------------------------------------
    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("PRAGMA synchronous=NORMAL")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _view(self, db: sqlite3.Connection, request_id: str) -> RequestView:
        r = db.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
        if r is None:
            raise ApprovalError(f"there is no request {request_id!r}; `pgwarden approvals list --all` shows them",
                                404)
        votes = tuple(Vote(v["approver"], v["at"]) for v in
                      db.execute("SELECT approver, at FROM votes WHERE request_id = ? ORDER BY at", (request_id,)))
        return RequestView(
            id=r["id"], state=r["state"], requester_subject=r["requester_subject"],
            requester_service_account=r["requester_sa"],
            reviewers=tuple(_ref(x) for x in json.loads(r["reviewers"])), min_approvals=r["min_approvals"],
            expires_at=r["expires_at"], votes=votes, decided_by=r["decided_by"])

    # -- the CLI's side ------------------------------------------------------------------------
    def decide_sync(self, request_id: str, approver: str, decision: str, reason: str = "") -> Change:
        """Record one reviewer's decision (raises ApprovalError with the reason it is refused)."""
        now = self.clock()
        with self._tx() as db:
            self._expire(db, now)
            req = self._view(db, request_id)
            change = decide(req, approver, decision, now)
            new_votes = change.votes[len(req.votes):]
            for v in new_votes:
                db.execute("INSERT INTO votes (request_id, approver, at) VALUES (?, ?, ?)",
                           (request_id, v.approver, v.at))
            db.execute("UPDATE requests SET state = ?, decided_by = ?, decided_at = ?, reason = ? WHERE id = ?",
                       (change.state, change.decided_by, now if change.state != PENDING else None,
                        reason if change.state != PENDING else "", request_id))
        return change

    @staticmethod
    def _row(db: sqlite3.Connection, r: sqlite3.Row) -> Row:
        votes = tuple(v[0] for v in db.execute("SELECT approver FROM votes WHERE request_id = ? ORDER BY at", (r["id"],)))
        return Row(
            id=r["id"], created_at=r["created_at"], expires_at=r["expires_at"], connection=r["connection"],
            requester_subject=r["requester_subject"], statement=r["statement"],
            params=tuple(json.loads(r["params"])), rule=r["rule"], reviewers=tuple(json.loads(r["reviewers"])),
            min_approvals=r["min_approvals"], mode=r["mode"], state=r["state"], decided_by=r["decided_by"],
            reason=r["reason"], votes=votes, policy=r["policy"], requester=json.loads(r["requester"] or "{}"),
            workload=json.loads(r["workload"] or "{}"), preview=_preview(r))

    def list_sync(self, include_decided: bool = False) -> list[Row]:
        with self._tx() as db:
            self._expire(db, self.clock())
            where = "" if include_decided else "WHERE state IN ('pending', 'approved')"
            rows = db.execute(f"SELECT * FROM requests {where} ORDER BY created_at").fetchall()
            return [self._row(db, r) for r in rows]

    def get_sync(self, request_id: str) -> Row:
        """One request in full (`approvals show`, and what `approve` prints before deciding)."""
        with self._tx() as db:
            self._expire(db, self.clock())
            r = db.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
            if r is None:
                raise ApprovalError(f"there is no request {request_id!r}; `pgwarden approvals list --all` shows them",
                                    404)
            return self._row(db, r)

    @staticmethod
    def _expire(db: sqlite3.Connection, now: float) -> None:
        # pending requests past expiry, and approved defer requests nobody used in their window
        db.execute("UPDATE requests SET state = 'expired', decided_at = ? "
                   "WHERE state IN ('pending', 'approved') AND expires_at <= ?", (now, now))

    # -- ApprovalBackend -------------------------------------------------------------------------
    async def create(self, spec: ApprovalSpec) -> Ticket:
        now = self.clock()
        request_id = f"{time.strftime('%H%M%S', time.gmtime(now))}-{secrets.token_hex(3)}"
        expires = now + spec.timeout
        who = spec.requester
        row = (
            request_id, now, expires, spec.connection, who.subject, who.service_account,
            json.dumps(who.as_dict()), json.dumps(dict(spec.workload)), spec.statement, json.dumps(list(spec.params)),
            spec.hash, spec.policy_id, spec.rule, json.dumps([str(r) for r in spec.reviewers]),
            max(1, spec.min_approvals), spec.mode, PENDING,
            json.dumps(spec.preview.to_json()) if spec.preview is not None else "",
        )

        def insert() -> None:
            with self._tx() as db:
                db.execute("INSERT INTO requests (id, created_at, expires_at, connection, requester_subject, "
                           "requester_sa, requester, workload, statement, params, statement_hash, policy, rule, "
                           "reviewers, min_approvals, mode, state, preview) VALUES "
                           "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

        await asyncio.to_thread(insert)
        # the agent sees approve_command (the PW001 hint): the request to ask about, not the command
        # that decides it nor the file that holds the queue
        ticket = Ticket(id=request_id, name=request_id, expires_at=expires, approve_command=local_agent_hint(request_id))
        if self.notifier is not None:
            db_hint = None if self.path == default_db_path() else str(self.path)
            self.notifier.notify(spec, ticket, review_command=local_command(request_id, "show", db_hint))
        return ticket

    def _poll(self, request_id: str, deadline: float) -> Outcome | None:
        now = self.clock()
        with self._db() as db:
            r = db.execute("SELECT state, decided_by, reason, expires_at FROM requests WHERE id = ?",
                           (request_id,)).fetchone()
            if r is None:
                return Outcome(EXPIRED, "", "the request no longer exists")
            if r["state"] == APPROVED:
                return Outcome(APPROVED, r["decided_by"], r["reason"])
            if r["state"] == DENIED:
                return Outcome(DENIED, r["decided_by"], r["reason"])
            if r["state"] in (EXPIRED, WITHDRAWN, EXECUTED):
                return Outcome(EXPIRED, r["decided_by"], r["reason"] or f"the request is {r['state']}")
            if now < min(deadline, r["expires_at"]):
                return None
        # time is up: expire it in a transaction, so an approval racing with us is either seen or refused
        with self._tx() as db:
            db.execute("UPDATE requests SET state = 'expired', decided_at = ? WHERE id = ? AND state = 'pending'",
                       (now, request_id))
            r = db.execute("SELECT state, decided_by, reason FROM requests WHERE id = ?", (request_id,)).fetchone()
        if r is not None and r["state"] == APPROVED:
            return Outcome(APPROVED, r["decided_by"], r["reason"])
        if r is not None and r["state"] == DENIED:
            return Outcome(DENIED, r["decided_by"], r["reason"])
        return Outcome(EXPIRED, "", "no decision before the timeout")

    async def wait(self, ticket: Ticket, timeout: float) -> Outcome:
        deadline = self.clock() + timeout
        try:
            while True:
                outcome = await asyncio.to_thread(self._poll, ticket.id, deadline)
                if outcome is not None:
                    if outcome.state == APPROVED:
                        await asyncio.to_thread(self._mark_executing, ticket.id)
                    return outcome
                await asyncio.sleep(self.poll_interval)
        except asyncio.CancelledError:
            await self.withdraw(ticket)
            raise

    def _mark_executing(self, request_id: str) -> None:
        """Wait mode: the held statement runs now, once; the approval cannot serve anything else."""
        with self._tx() as db:
            db.execute("UPDATE requests SET state = 'executed', executed_at = ? WHERE id = ? AND state = 'approved'",
                       (self.clock(), request_id))

    async def withdraw(self, ticket: Ticket) -> None:
        def run() -> None:
            with self._tx() as db:
                db.execute("UPDATE requests SET state = 'withdrawn', decided_at = ?, reason = ? "
                           "WHERE id = ? AND state IN ('pending', 'approved')",
                           (self.clock(), "withdrawn: the client cancelled the statement", ticket.id))

        await asyncio.to_thread(run)

    async def consume(self, spec: ApprovalSpec) -> Ticket | None:
        now = self.clock()
        h = spec.hash

        def run() -> Ticket | None:
            with self._tx() as db:
                self._expire(db, now)
                rows = db.execute(
                    "SELECT id, expires_at, statement, params, requester_subject, requester, connection, policy, "
                    "decided_by, preview "
                    "FROM requests "
                    "WHERE statement_hash = ? AND state = 'approved' AND mode = 'defer' ORDER BY decided_at",
                    (h,)).fetchall()
                for r in rows:
                    # the hash is a lookup key; the binding is checked field by field
                    if (r["statement"], tuple(json.loads(r["params"])), r["requester_subject"], r["connection"]) != (
                            spec.statement, spec.params, spec.requester.subject, spec.connection):
                        continue
                    if _issuer_of(r["requester"]) != spec.requester.issuer:  # same sub, another issuer
                        continue
                    if spec.policy_id and r["policy"] and r["policy"] != spec.policy_id:
                        continue
                    cur = db.execute("UPDATE requests SET state = 'executed', executed_at = ? "
                                     "WHERE id = ? AND state = 'approved'", (now, r["id"]))
                    if cur.rowcount == 1:
                        # the approval is bound to the effect its reviewer saw (the PW005 guard)
                        return Ticket(id=r["id"], name=r["id"], expires_at=r["expires_at"],
                                      approve_command=local_agent_hint(r["id"]), decided_by=r["decided_by"],
                                      preview=_preview(r))
            return None

        return await asyncio.to_thread(run)

    async def executed(self, ticket: Ticket, outcome_tag: str) -> None:
        def run() -> None:
            with self._tx() as db:
                db.execute("UPDATE requests SET state = 'executed', executed_at = COALESCE(executed_at, ?), "
                           "outcome_tag = ? WHERE id = ? AND state IN ('approved', 'executed')",
                           (self.clock(), outcome_tag, ticket.id))

        await asyncio.to_thread(run)

    async def close(self) -> None:
        if self.notifier is not None:
            await self.notifier.close()


def _preview(r: sqlite3.Row) -> Preview | None:
    try:
        return Preview.from_json(json.loads(r["preview"])) if r["preview"] else None
    except (ValueError, IndexError, KeyError):
        return None


def _issuer_of(requester_json: str) -> str:
    try:
        data = json.loads(requester_json)
    except ValueError:
        return "\0unreadable"  # matches no issuer
    issuer = data.get("issuer", "") if isinstance(data, dict) else "\0unreadable"
    return issuer if isinstance(issuer, str) else "\0unreadable"
