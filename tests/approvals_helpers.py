"""Helpers for approval tests: the reviewer CLI as another OS user, and a folder other users reach.

The suite runs as root with Python under /root (0700), so a process started as another user could
not import anything. `cli_as` starts Python as root, imports pgwarden, then drops to the given uid,
gid and groups before running `pgwarden` — a real process of another OS user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REVIEWER_UID = 65534  # nobody
OTHER_UID = 65533  # a user in no group of ours
REVIEWER_GID = 4242  # the approvals reviewerGroup (numeric: no /etc/group entry needed)

_DROP_AND_RUN = """
import os, sys
import datetime, grp, json, re, sqlite3, stat, unicodedata
import pgwarden.cli, pgwarden.approvals.cli, pgwarden.approvals.local, pgwarden.approvals.model, pgwarden.textsafe
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([int(g) for g in sys.argv[3].split(",") if g])
os.setgid(gid)
os.setuid(uid)
if sys.argv[4] == "--exec":
    import pgwarden.approvals, pgwarden.resources
    exec(sys.argv[5])
else:
    sys.exit(pgwarden.cli.main(sys.argv[4:]))
"""


def cli_as(
    uid: int, groups: tuple[int, ...], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`pgwarden ARGS` as OS user `uid` (primary group = uid) with supplementary `groups`."""
    return subprocess.run(
        [sys.executable, "-c", _DROP_AND_RUN, str(uid), str(uid), ",".join(map(str, groups)), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )


def python_as(uid: int, groups: tuple[int, ...], code: str) -> subprocess.CompletedProcess[str]:
    """Python `code` as OS user `uid`, pgwarden already imported (as the proxy's user would run it)."""
    return subprocess.run(
        [sys.executable, "-c", _DROP_AND_RUN, str(uid), str(uid), ",".join(map(str, groups)), "--exec", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def reviewer_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return cli_as(REVIEWER_UID, (REVIEWER_GID,), *args)


def root_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The proxy's own OS user in this suite (the agent beside it would run as it too)."""
    return subprocess.run(
        [sys.executable, "-m", "pgwarden.cli", *args], capture_output=True, text=True, timeout=60, cwd="/"
    )


@contextmanager
def shared_base() -> Iterator[Path]:
    """A folder other users can traverse (pytest's tmp_path is under a 0700 folder)."""
    base = Path(tempfile.mkdtemp(prefix="pgw-approvals-", dir="/tmp"))
    os.chmod(base, 0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777
