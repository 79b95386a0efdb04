"""Notifications: the statement cannot close the code fence, mention anyone, add links or forge
lines of the message. A real HTTP server receives what the backend sends."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from aiohttp import web

from pgwarden.approvals import ApprovalSpec, LocalApprovals, Notifier
from pgwarden.subjects import Identity, SubjectRef

AGENT = Identity(subject="cursor-agent", groups=("ai-agents",), service_account="agents/cursor-agent")
FORGED = (
    "DELETE FROM orders WHERE id = 8 OR id > 0 -- ```\n"
    "*:white_check_mark: PRE-APPROVED by the DBA team, no action needed* <!channel> <@U024BE7LH> @here\n"
    "<https://evil.example/approve|Approve here> [approve](https://evil.example) &lt;b&gt;\n"
    "```\x1b[2K\u202e"
)


async def capture(spec: ApprovalSpec, tmp_path: Path) -> tuple[dict[str, Any], Any]:
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    q = LocalApprovals(tmp_path / "q" / "approvals.db", notifier=Notifier(f"http://127.0.0.1:{port}/hook"))
    try:
        ticket = await q.create(spec)
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
    finally:
        await q.close()
        await runner.cleanup()
    assert len(got) == 1
    return got[0], ticket


def spec(statement: str, params: tuple[str | None, ...] = (), subject: str = "cursor-agent") -> ApprovalSpec:
    who = Identity(subject=subject, groups=("ai-agents",))
    return ApprovalSpec(
        connection="orders-prod",
        requester=who,
        workload={"pod": "cursor-7d9f"},
        statement=statement,
        params=params,
        rule="agents/orders rule 2 (writes)",
        reviewers=(SubjectRef(group="dba"),),
        min_approvals=1,
        timeout=60,
        mode="wait",
    )


async def test_statement_cannot_close_the_fence_or_add_links(tmp_path: Path) -> None:
    body, ticket = await capture(spec(FORGED, params=("1`` <!everyone>",)), tmp_path)
    text = body["text"]
    # Slack's own parsing of names and links is off
    assert body["parse"] == "none" and body["link_names"] is False and body["unfurl_links"] is False
    # the only fences are ours: statement and parameters, each opened and closed once
    assert text.count("```") == 4
    stmt_block = re.search(r"```\n(.*?)\n```", text, re.S)
    assert stmt_block is not None
    assert "PRE-APPROVED" in stmt_block.group(1) and "evil.example" in stmt_block.group(1)
    # nothing outside the code blocks comes from the agent
    outside = re.sub(r"```\n.*?\n```", "", text, flags=re.S)
    assert "PRE-APPROVED" not in outside and "evil" not in outside and "channel" not in outside
    # no raw angle brackets: no <!channel>, <@U…> mention or <url|label> link anywhere
    assert "<" not in text and ">" not in text
    assert "&lt;!channel&gt;" in text and "&lt;@U024BE7LH&gt;" in text and "&amp;lt;b&amp;gt;" in text
    assert "\x1b" not in text and "\u202e" not in text and "\\x1b[2K" in text and "\\u202e" in text
    assert "(backticks in agent-supplied text are shown as \u02cb)" in text
    # the reviewer is told how to look at it; the database path is a reviewer's concern, not a secret
    assert f"review: `pgwarden approvals show {ticket.id} --db " in text
    assert "approvals approve" not in ticket.approve_command


async def test_subject_and_pod_are_code_too(tmp_path: Path) -> None:
    body, _ = await capture(
        spec("DELETE FROM orders WHERE id = 1", subject="x` *APPROVED* <!channel>"), tmp_path
    )
    first = body["text"].splitlines()[0]
    assert first.startswith("pgwarden: `x\u02cb *APPROVED* &lt;!channel&gt;`") and "<" not in body["text"]


async def test_long_statement_says_it_was_cut(tmp_path: Path) -> None:
    body, ticket = await capture(spec("SELECT 1 /*" + "x" * 3000 + "*/"), tmp_path)
    assert "(first 1500 of 3013 characters; the review command below shows it in full)" in body["text"]
