"""Tell reviewers that a request is waiting: a Slack-compatible webhook (`{"text": …}`).

The message is built by `notification_text`: everything the agent controls sits inside code,
escaped for mrkdwn, and Slack's own parsing of names and links is turned off, so a statement
cannot close the fence, mention people, add links or forge a "pre-approved" line.

A notification must never hold a statement up or fail it: `notify` only schedules a background
task and returns. The task retries with exponential back-off (a chat service being down for a
minute should not lose the message) and gives up quietly after `attempts`, logging why.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from pgwarden.approvals.model import ApprovalSpec, Ticket, notification_text

log = logging.getLogger("pgwarden.approvals.notify")


class Notifier:
    def __init__(self, default_url: str = "", *, attempts: int = 5, first_delay: float = 1.0,
                 max_delay: float = 60.0, timeout: float = 10.0) -> None:
        self.default_url = default_url
        self.attempts = attempts
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self._tasks: set[asyncio.Task[bool]] = set()
        self._session: aiohttp.ClientSession | None = None

    def notify(self, spec: ApprovalSpec, ticket: Ticket, review_command: str = "") -> asyncio.Task[bool] | None:
        """Schedule the message (the policy's notifyUrl, else the configured default); never blocks.

        `review_command` is what a reviewer types (it may differ from what the agent is told)."""
        url = spec.notify_url or self.default_url
        if not url:
            return None
        task = asyncio.get_running_loop().create_task(self._send(url, payload(spec, ticket, review_command)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def notify_text(self, url: str, text: str) -> asyncio.Task[bool] | None:
        """Schedule a message of `text` (already escaped for mrkdwn) to `url`, else the default."""
        url = url or self.default_url
        if not url:
            return None
        body = {"text": text, "parse": "none", "link_names": False, "unfurl_links": False, "unfurl_media": False}
        task = asyncio.get_running_loop().create_task(self._send(url, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _send(self, url: str, payload: dict[str, Any]) -> bool:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        delay = self.first_delay
        problem = ""
        for attempt in range(1, self.attempts + 1):
            try:
                async with self._session.post(url, json=payload) as resp:
                    if resp.status < 300:
                        return True
                    problem = f"HTTP {resp.status}"
                    if 400 <= resp.status < 500 and resp.status not in (408, 429):
                        break  # the URL or payload is wrong: retrying will not help
            except (aiohttp.ClientError, TimeoutError) as e:
                problem = f"{type(e).__name__}: {e}"
            if attempt < self.attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
        log.warning("approval notification to %s failed (%s); reviewers see the request in "
                    "`pgwarden approvals list` / `kubectl get approvalrequests`", _redact(url), problem)
        return False

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


def payload(spec: ApprovalSpec, ticket: Ticket, review_command: str = "") -> dict[str, Any]:
    """The webhook body: mrkdwn text with Slack's name and link parsing off (`parse: none`)."""
    return {"text": notification_text(spec, ticket, review_command), "parse": "none", "link_names": False,
            "unfurl_links": False, "unfurl_media": False}


def _redact(url: str) -> str:
    # Slack webhook URLs carry their secret in the path
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/…"
