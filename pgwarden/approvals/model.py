"""The approval contract shared by both backends, the proxy's gate, the CLI and the operator.

An approval is bound to exactly one statement run by exactly one requester on exactly one
connection: `statement_hash` covers the statement text, its parameters, the requester's subject
and issuer (a token of another issuer with the same `sub` is someone else) and the connection, so an approval for `DELETE … WHERE id = $1` with `1` never lets `2` through,
and an approval granted to one agent never lets another agent run the same text.

Everything here is pure (no I/O): the backends are thin shells that store what these functions
decide, so the rules (final decisions, no self-approval, distinct approvers, expiry) are tested
once and enforced the same way by the SQLite queue and by the Kubernetes webhook.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from pgwarden.subjects import Identity, SubjectRef
from pgwarden.times import iso

Mode = Literal["wait", "defer"]
State = Literal["approved", "denied", "expired"]

# Request states of the local queue (the Kubernetes phases are these, capitalised).
PENDING: Final = "pending"
APPROVED: Final = "approved"
DENIED: Final = "denied"
EXPIRED: Final = "expired"
EXECUTED: Final = "executed"
WITHDRAWN: Final = "withdrawn"
FINAL_STATES = (DENIED, EXPIRED, EXECUTED, WITHDRAWN)

PreviewState = Literal["measured", "unavailable", "timeout", "failed"]
PREVIEW_STATES: tuple[str, ...] = ("measured", "unavailable", "timeout", "failed")
PREVIEW_SAMPLE_MAX = 5  # rows of a sample, as stored and shown
PREVIEW_VALUE_MAX = 200  # characters of one sampled value


@dataclass(frozen=True)
class Preview:
    """What the held write would change, measured before the request was filed (approval.preview: rows).

    `state` measured: `affected_rows` is the count the statement reported in a rolled-back run, and
    `sample` up to a few of those rows, masked as the agent would see them (UPDATE: each sample row
    is {"before": {...}, "after": {...}}; INSERT and DELETE: {"row": {...}}). unavailable: the
    statement was not run (`reason` says why); timeout / failed: it was run and did not finish.
    """

    state: str  # PreviewState
    affected_rows: int | None = None
    sample: tuple[Mapping[str, Any], ...] = ()
    reason: str = ""
    columns: tuple[str, ...] = ()  # the sample's column names, in the statement's order

    @property
    def measured(self) -> bool:
        return self.state == "measured" and self.affected_rows is not None

    def to_json(self) -> dict[str, Any]:
        """The camelCase form stored on the request (CRD spec.preview, the local queue, --json)."""
        out: dict[str, Any] = {"state": self.state}
        if self.affected_rows is not None:
            out["affectedRows"] = self.affected_rows
        out["sample"] = [dict(r) for r in self.sample]
        if self.columns:
            out["columns"] = list(self.columns)
        if self.reason:
            out["reason"] = self.reason if len(self.reason) <= 2000 else self.reason[:1999] + "…"
        return out

    @classmethod
    def from_json(cls, data: Any) -> Preview | None:
        """A stored preview, or None for none (or one this version cannot read)."""
        if not isinstance(data, Mapping) or data.get("state") not in PREVIEW_STATES:
            return None
        rows = data.get("affectedRows")
        sample = data.get("sample") or ()
        return cls(
            state=str(data["state"]),
            affected_rows=rows if isinstance(rows, int) and not isinstance(rows, bool) and rows >= 0 else None,
            sample=tuple(r for r in sample if isinstance(r, Mapping)) if isinstance(sample, list) else (),
            reason=str(data.get("reason") or ""),
            columns=tuple(str(c) for c in data.get("columns") or () if isinstance(c, str)),
        )

    def summary(self) -> str:
        """One line: what the preview found (shown by the CLI and the notification)."""
        if self.measured:
            n = self.affected_rows
            return f"{n:,} row{'' if n == 1 else 's'} affected (measured in a rolled-back run)"
        what = {"unavailable": "no preview", "timeout": "the preview timed out",
                "failed": "the preview failed"}.get(self.state, self.state)
        return what + (f": {self.reason}" if self.reason else "")


@dataclass(frozen=True)
class ApprovalSpec:
    """What the proxy's gate knows when a policy says `review`."""

    connection: str
    requester: Identity
    workload: Mapping[str, str]
    statement: str
    params: tuple[str | None, ...]
    rule: str
    reviewers: tuple[SubjectRef, ...]
    min_approvals: int
    timeout: float
    mode: Mode
    # "namespace/name" of the AccessPolicy that asked for review; derived from `rule` when empty
    policy: str = ""
    # Slack-compatible webhook called when the request is created (AccessPolicy approval.notifyUrl)
    notify_url: str = ""
    # what the statement would change (approval.preview: rows); None: previews are off
    preview: Preview | None = None

    @property
    def policy_id(self) -> str:
        if self.policy:
            return self.policy
        # rule labels read "NS/NAME rule 3 (name)" (pgwarden.policy.model.AccessPolicy.rule_label)
        return self.rule.split(" rule ", 1)[0] if " rule " in self.rule else ""

    @property
    def hash(self) -> str:
        return statement_hash(self.statement, self.params, self.requester.subject, self.connection,
                              self.requester.issuer)

    @property
    def params_hash(self) -> str:
        return params_hash(self.params)


@dataclass(frozen=True)
class Ticket:
    """A created request, as the gate shows it to the client (NoticeResponse, PW001 hint)."""

    id: str
    name: str
    expires_at: float  # epoch seconds
    approve_command: str
    deny_command: str = ""
    namespace: str = ""
    # who approved ("alice, bob"), when the backend knows it: `consume` (defer mode) fills it so the
    # gate can attribute the approval in the audit chain before the statement is forwarded
    decided_by: str = ""
    # the preview stored with the request (`consume` fills it: an approval is bound to its effect)
    preview: Preview | None = None


@dataclass(frozen=True)
class Outcome:
    state: State
    decided_by: str = ""
    reason: str = ""


class TextNotifier(Protocol):
    """Posts a line of text to a webhook (approvals/notify.py `Notifier`)."""

    def notify_text(self, url: str, text: str) -> Any: ...


class ApprovalBackend(Protocol):
    """Where requests live and where decisions come from. Both backends enforce the same rules.

    The gate calls `create` then `wait` (mode wait) or `consume` then `create` (mode defer);
    `withdraw` on a client cancel; `executed` after the statement ran (the audit of its tag).
    `notifier`: the webhook the backend posts new requests to (the proxy posts lockouts there too).
    """

    @property
    def notifier(self) -> TextNotifier | None: ...

    async def create(self, spec: ApprovalSpec) -> Ticket: ...

    async def wait(self, ticket: Ticket, timeout: float) -> Outcome: ...

    async def withdraw(self, ticket: Ticket) -> None: ...

    async def consume(self, spec: ApprovalSpec) -> Ticket | None: ...

    async def executed(self, ticket: Ticket, outcome_tag: str) -> None: ...

    async def close(self) -> None: ...


class ApprovalError(Exception):
    """A decision that the rules refuse; the message says why and what to do instead."""

    def __init__(self, message: str, code: int = 403) -> None:
        super().__init__(message)
        self.code = code


# -- binding ----------------------------------------------------------------------------------

def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def statement_hash(statement: str, params: Sequence[str | None], requester_subject: str, connection: str,
                   requester_issuer: str = "") -> str:
    """sha256 of the canonical JSON of everything an approval is bound to (versioned)."""
    return hashlib.sha256(canonical_json({
        "v": 2,
        "statement": statement,
        "params": list(params),
        "requester": requester_subject,
        "issuer": requester_issuer,
        "connection": connection,
    })).hexdigest()


def params_hash(params: Sequence[str | None]) -> str:
    return hashlib.sha256(canonical_json(list(params))).hexdigest()


# -- who is who -------------------------------------------------------------------------------

SA_PREFIX = "system:serviceaccount:"


def identity_from_username(username: str, groups: Iterable[str] = ()) -> Identity:
    """A Kubernetes username (`system:serviceaccount:NS:NAME` for service accounts) as an Identity."""
    sa = ""
    if username.startswith(SA_PREFIX):
        ns, _, name = username[len(SA_PREFIX):].partition(":")
        if ns and name:
            sa = f"{ns}/{name}"
    return Identity(subject=username, groups=tuple(groups), service_account=sa, method="kubernetes")


def same_principal(who: Identity, subject: str, service_account: str = "") -> bool:
    """Is `who` the requester? Compares subjects and service accounts in both spellings
    (`agents/cursor` and `system:serviceaccount:agents:cursor`), case-sensitively as Kubernetes does."""
    if not who.subject and not who.service_account:
        return False
    names = {who.subject}
    if who.service_account:
        ns, _, name = who.service_account.partition("/")
        names |= {who.service_account, f"{SA_PREFIX}{ns}:{name}"}
    theirs = {s for s in (subject, service_account) if s}
    for s in list(theirs):
        if "/" in s and not s.startswith(SA_PREFIX):
            ns, _, name = s.partition("/")
            theirs.add(f"{SA_PREFIX}{ns}:{name}")
        if s.startswith(SA_PREFIX):
            ns, _, name = s[len(SA_PREFIX):].partition(":")
            theirs.add(f"{ns}/{name}")
    return bool(names & theirs)


def name_key(name: str) -> str:
    """A self-declared name as compared: `AGENT`, `ａｇｅｎｔ` (fullwidth) and `agént` / `agent` + a combining
    mark all compare equal to `agent`. NFKC folds compatibility forms, NFKD + dropping marks removes
    accents and combining characters, case folding removes case; format characters (zero-width
    joiners, bidi controls) are dropped."""
    text = unicodedata.normalize("NFKC", name).casefold()
    text = "".join(c for c in unicodedata.normalize("NFKD", text)
                   if not unicodedata.combining(c) and unicodedata.category(c) not in ("Cf", "Mn", "Me"))
    return unicodedata.normalize("NFKC", text).casefold().strip()


def check_local_name(name: str) -> str:
    """A name given with `--as` in local mode, or ApprovalError. After folding it must be printable
    ASCII: a name in another script (Cyrillic `а` for Latin `a`) could pass for the requester's own."""
    name = name.strip()
    if not name:
        raise ApprovalError("say who you are: --as NAME", 400)
    key = name_key(name)
    if not key or not key.isascii() or not key.isprintable() or not name.isprintable():
        raise ApprovalError(f"{name!r} is not a usable reviewer name in local mode: use printable ASCII letters, "
                            "digits and punctuation (names in other scripts could imitate the requester's)", 400)
    return name


def same_local_principal(approver: str, subject: str, service_account: str = "") -> bool:
    """Local mode: is the self-declared `approver` the requester, in any spelling? Compares every
    spelling of the requester (`agents/cursor`, `system:serviceaccount:agents:cursor`, and the bare
    service-account name) after `name_key`, so case, width and combining-mark variants are refused."""
    theirs = {s for s in (subject, service_account) if s}
    for s in list(theirs):
        if s.startswith(SA_PREFIX):
            ns, _, name = s[len(SA_PREFIX):].partition(":")
            theirs |= {f"{ns}/{name}", name}
        elif "/" in s:
            ns, _, name = s.partition("/")
            theirs |= {f"{SA_PREFIX}{ns}:{name}", name}
    mine = {approver}
    if approver.startswith(SA_PREFIX):
        ns, _, name = approver[len(SA_PREFIX):].partition(":")
        mine.add(f"{ns}/{name}")
    return bool({name_key(x) for x in mine} & {name_key(x) for x in theirs if name_key(x)})


def describe_reviewers(reviewers: Iterable[SubjectRef]) -> str:
    return ", ".join(str(r) for r in reviewers) or "(none)"


# -- the commands a reviewer types -----------------------------------------------------------

def kubectl_patch_command(name: str, namespace: str, decision: str = "approved") -> str:
    body = json.dumps({"spec": {"decision": decision}}, separators=(",", ":"))
    return f"kubectl patch approvalrequest {name} -n {namespace} --type merge -p {shlex.quote(body)}"


def local_command(request_id: str, verb: str = "approve", db: str | None = None) -> str:
    """The command a reviewer types (notifications, docs); never shown to the agent."""
    db_arg = f" --db {shlex.quote(db)}" if db else ""
    as_arg = " --as YOU" if verb in ("approve", "deny") else ""
    return f"pgwarden approvals {verb} {request_id}{as_arg}{db_arg}"


def local_agent_hint(request_id: str) -> str:
    """What the agent is told in local mode: which request to ask about, not how to decide it, nor
    where the queue is (the database path would tell it which file to write)."""
    return f"`pgwarden approvals show {request_id}` on the reviewer's side, then approve or deny it"


# -- decisions (the local queue's rules; the operator's webhook applies the same ones) -------

@dataclass(frozen=True)
class Vote:
    approver: str
    at: float


@dataclass(frozen=True)
class RequestView:
    """The fields of a stored request that a decision depends on."""

    id: str
    state: str
    requester_subject: str
    requester_service_account: str
    reviewers: tuple[SubjectRef, ...]
    min_approvals: int
    expires_at: float
    votes: tuple[Vote, ...] = ()
    decided_by: str = ""


@dataclass(frozen=True)
class Change:
    """What to store after a decision: the new state and votes, and what to tell the person."""

    state: str
    votes: tuple[Vote, ...]
    decided_by: str
    message: str
    notes: tuple[str, ...] = field(default=())


def decide(req: RequestView, approver: str, decision: str, now: float | None = None) -> Change:
    """Apply one reviewer's decision to a request, or raise ApprovalError saying why not.

    In local mode `approver` is self-declared (`--as NAME`): the queue cannot check group
    membership, so only `user:` reviewers are compared by name; the CLI says so.
    """
    now = time.time() if now is None else now
    if decision not in (APPROVED, DENIED):
        raise ApprovalError(f"unknown decision {decision!r}; use approve or deny", 400)
    approver = check_local_name(approver)
    if req.state == APPROVED or req.state in FINAL_STATES:
        by = f" by {req.decided_by}" if req.decided_by else ""
        raise ApprovalError(f"request {req.id} is already {req.state}{by}; a decision is final — "
                            "the requester must run the statement again to create a new request", 409)
    if now >= req.expires_at:
        raise ApprovalError(f"request {req.id} expired at {iso(req.expires_at)}; the requester must run the "
                            "statement again to create a new request", 409)
    who = identity_from_username(approver)
    if same_principal(who, req.requester_subject, req.requester_service_account) or same_local_principal(
            approver, req.requester_subject, req.requester_service_account):
        raise ApprovalError(f"{approver} requested this statement and cannot decide it; another reviewer "
                            f"({describe_reviewers(req.reviewers)}) must", 403)
    notes: list[str] = []
    users = [r for r in req.reviewers if r.user]
    if users and len(users) == len(req.reviewers) and not any(r.matches(who) for r in users):
        raise ApprovalError(f"{approver} is not a reviewer of this request; reviewers: "
                            f"{describe_reviewers(req.reviewers)}", 403)
    if len(users) != len(req.reviewers):
        notes.append(f"group / service-account reviewers ({describe_reviewers(req.reviewers)}) cannot be "
                     "checked in local mode")
    if decision == DENIED:
        return Change(DENIED, req.votes, approver, f"request {req.id} denied by {approver}", tuple(notes))
    if any(name_key(v.approver) == name_key(approver) for v in req.votes):
        left = req.min_approvals - len(req.votes)
        raise ApprovalError(f"{approver} already approved request {req.id}; it needs {left} more approval(s) "
                            "from other reviewers", 409)
    votes = (*req.votes, Vote(approver, now))
    if len(votes) < req.min_approvals:
        left = req.min_approvals - len(votes)
        return Change(PENDING, votes, "", f"approval {len(votes)} of {req.min_approvals} for request {req.id} "
                                          f"recorded; {left} more needed from other reviewers", tuple(notes))
    decided_by = ", ".join(v.approver for v in votes)
    return Change(APPROVED, votes, decided_by, f"request {req.id} approved by {decided_by}", tuple(notes))


def parse_iso(value: str) -> float:
    """RFC 3339 (as Kubernetes writes it) -> epoch seconds."""
    import datetime as dt

    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


NOTIFY_STATEMENT_MAX = 1500


def mrkdwn_code(text: str) -> tuple[str, bool]:
    """`text` made safe inside a Slack-compatible code span or fence.

    Inside code, mrkdwn still decodes `&amp;` / `&lt;` / `&gt;` (so `<@U123>` or `<!channel>` would
    become a mention, `<https://x|click>` a link); a backtick would close the fence and let the rest
    of the text format itself (links, a fake "pre-approved" banner). There is no escape for a
    backtick inside code, so it is replaced by U+02CB (ˋ) and the message says so. Control and
    bidi characters are shown as visible escapes."""
    from pgwarden.textsafe import escape

    text = escape(text, multiline=True)
    had_backtick = "`" in text
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "\u02cb")
    return text, had_backtick


def sample_text_lines(preview: Preview) -> str:
    """The sample as one JSON object per line (UPDATE: before → after), for people to read. The
    values come from the database (which the agent may have written): callers escape the result."""
    out = []
    for r in preview.sample:
        if "before" in r or "after" in r:
            before = json.dumps(r.get("before"), ensure_ascii=False)
            after = json.dumps(r.get("after"), ensure_ascii=False)
            out.append(f"{before} -> {after}")
        else:
            out.append(json.dumps(r.get("row", r), ensure_ascii=False))
    return "\n".join(out)


def notification_text(spec: ApprovalSpec, ticket: Ticket, review_command: str = "") -> str:
    """The message for a Slack-compatible webhook. Everything the agent controls (its subject, pod,
    statement, parameters) is inside code, escaped by `mrkdwn_code`, so it cannot close the fence,
    mention anyone, add a link or forge lines of the message."""
    stmt = spec.statement
    clipped = len(stmt) > NOTIFY_STATEMENT_MAX
    if clipped:
        stmt = stmt[:NOTIFY_STATEMENT_MAX]
    stmt_text, ticks = mrkdwn_code(stmt)
    who, ticks_who = mrkdwn_code(" ".join(spec.requester.subject.split()))
    pod, ticks_pod = mrkdwn_code(" ".join(str(spec.workload.get("pod") or "").split()))
    lines = [f"pgwarden: `{who}`" + (f" (pod `{pod}`)" if pod else "")
             + f" asks to run on `{mrkdwn_code(spec.connection)[0]}` ({mrkdwn_code(spec.rule)[0]}),"
             + f" request {mrkdwn_code(ticket.name)[0]}:",
             f"```\n{stmt_text}\n```"]
    if clipped:
        lines.append(f"(first {NOTIFY_STATEMENT_MAX} of {len(spec.statement)} characters; the review command "
                     "below shows it in full)")
    if spec.params:
        params_text, ticks_params = mrkdwn_code(json.dumps(list(spec.params), ensure_ascii=False))
        ticks = ticks or ticks_params
        lines.append(f"parameters:\n```\n{params_text}\n```")
    if spec.preview is not None:
        pv = spec.preview
        summary, ticks_pv = mrkdwn_code(pv.summary())
        ticks = ticks or ticks_pv
        lines.append(f"preview: {summary}" if pv.measured else f"preview: `{summary}`")
        if pv.sample:
            sample_text, ticks_sample = mrkdwn_code(sample_text_lines(pv))
            ticks = ticks or ticks_sample
            lines.append(f"sample (masked):\n```\n{sample_text}\n```")
    if ticks or ticks_who or ticks_pod:
        lines.append("(backticks in agent-supplied text are shown as \u02cb)")
    lines.append(f"review: `{mrkdwn_code(review_command or ticket.approve_command)[0]}`")
    lines.append(f"expires {iso(ticket.expires_at)}")
    return "\n".join(lines)
