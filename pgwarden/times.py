"""Times as every record, status and request writes them: UTC, ISO 8601 to the second, with Z."""

from __future__ import annotations

import time


def iso(epoch: float | None = None) -> str:
    """`epoch` (now when None) as `2026-11-29T23:41:24Z`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if epoch is None else epoch))
