"""A real terminal for CLI tests: a tmux pane running bash, read back with `capture-pane`.

`capture-pane -p` returns what a person sees after the terminal has acted on every escape
sequence (cursor moves, erases, links), which is what the tests assert on.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


class Terminal:
    def __init__(self, socket: str, session: str) -> None:
        self.socket = socket
        self.session = session

    def _tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", self.session)

    def run(self, command: str, timeout: float = 60) -> str:
        """Type `command` into the pane, wait for it to finish, return the screen (cleared first)."""
        marker = f"done-{uuid.uuid4().hex[:8]}"
        self._tmux("send-keys", "-t", self.session, "clear", "Enter")
        time.sleep(0.2)
        self._tmux("clear-history", "-t", self.session)
        self._tmux("send-keys", "-t", self.session, "-l", f"{command}; echo {marker[:5]}''{marker[5:]}")
        self._tmux("send-keys", "-t", self.session, "Enter")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if any(line.strip() == marker for line in screen.splitlines()):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{command!r} did not finish in the terminal; screen:\n{self.screen()}")


@contextmanager
def terminal(env: Mapping[str, str], cwd: Path, width: int = 250, height: int = 80) -> Iterator[Terminal]:
    socket = f"pgw-{uuid.uuid4().hex[:8]}"
    full_env = {**os.environ, **env, "PS1": "$ ", "TERM": "xterm-256color"}
    shell = "bash --norc --noprofile"
    subprocess.run(
        [
            "tmux",
            "-L",
            socket,
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            str(width),
            "-y",
            str(height),
            "-c",
            str(cwd),
            shell,
        ],
        env=full_env,
        check=True,
        timeout=30,
    )
    try:
        yield Terminal(socket, "t")
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, timeout=30)


def pgwarden_command(*args: str) -> str:
    import sys

    return shlex.join([sys.executable, "-m", "pgwarden.cli", *args])
