"""A throw-away PostgreSQL server for the demo and the test suite.

initdb into a temporary folder, scram-sha-256 password authentication, a free TCP port on
loopback, and `log_statement=all` so callers can prove which statements did (or did not)
reach the server. initdb refuses to run as root, so under root the server runs as the
unprivileged `postgres` user (created where missing).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class EmbeddedPostgresError(RuntimeError):
    """The local PostgreSQL server could not be started."""


def find_bindir() -> Path:
    """Locate PostgreSQL server binaries: PATH, then Debian's /usr/lib/postgresql/*/bin."""
    override = os.environ.get("PGWARDEN_PG_BINDIR")
    if override:
        return Path(override)
    initdb = shutil.which("initdb")
    if initdb:
        return Path(os.path.realpath(initdb)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key, reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    try:  # a pip-installable server, for machines without system packages
        import pgserver  # type: ignore[import-not-found]

        return Path(pgserver.__file__).parent / "pginstall" / "bin"
    except ImportError:
        pass
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries found: install them (apt-get install postgresql) "
        "or set PGWARDEN_PG_BINDIR to the folder holding initdb and postgres"
    )


def _version_key(path: str) -> int:
    part = path.split("/")[4]
    return int(part) if part.isdigit() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _service_user() -> pwd.struct_passwd | None:
    """The user to run the server as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
            check=True,
        )
        return pwd.getpwnam("postgres")


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server in a temporary folder; use as a context manager or start()/stop()."""

    superuser: str = "postgres"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    port: int = 0
    host: str = "127.0.0.1"
    settings: dict[str, str] = field(default_factory=dict)
    base: Path | None = None
    bindir: Path | None = None

    def __post_init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = _service_user()

    # -- paths -----------------------------------------------------------------------------
    @property
    def datadir(self) -> Path:
        assert self.base is not None
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base is not None
        return self.base / "sock"

    @property
    def logfile(self) -> Path:
        assert self.base is not None
        return self.base / "postgres.log"

    def _run_as_owner(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
        if self._owner is not None:
            argv = ["runuser", "-u", self._owner.pw_name, "--", *argv]
        return subprocess.run(argv, capture_output=True, check=False, **kw)  # type: ignore[call-overload]

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> EmbeddedPostgres:
        self.bindir = self.bindir or find_bindir()
        self.base = self.base or Path(tempfile.mkdtemp(prefix="pgwarden-pg-"))
        self.base.chmod(0o755)
        self._chown(self.base)
        self.port = self.port or free_port()
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        res = self._run_as_owner(
            [
                str(self.bindir / "initdb"),
                "-D", str(self.datadir),
                "-U", self.superuser,
                "--pwfile", str(pwfile),
                "--auth", "scram-sha-256",
                "-E", "UTF8",
                "--locale", "C",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        if res.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed: {res.stderr.decode(errors='replace')}")
        self.socket_dir.mkdir()
        self._chown(self.socket_dir)
        conf = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "log_statement": "'all'",
            "log_line_prefix": "'%m [%p] %u@%d '",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "128MB",
            **self.settings,
        }
        with open(self.datadir / "postgresql.conf", "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        log = open(self.logfile, "ab")
        self._chown(self.logfile)
        argv = [str(self.bindir / "postgres"), "-D", str(self.datadir)]
        if self._owner is not None:
            argv = ["runuser", "-u", self._owner.pw_name, "--", *argv]
        self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise EmbeddedPostgresError(f"postgres exited at start: {self.logfile.read_text()[-2000:]}")
            res = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", self.host, "-p", str(self.port), "-q"],  # type: ignore[operator]
                check=False,
            )
            if res.returncode == 0:
                return
            time.sleep(0.1)
        raise EmbeddedPostgresError(f"postgres did not accept connections within {timeout}s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._run_as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "stop", "-m", "fast", "-w"])  # type: ignore[operator]
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    def restart(self) -> None:
        """Stop the server (fast) and start it again on the same port, keeping the data."""
        assert self._proc is not None
        self._run_as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "stop", "-m", "immediate", "-w"])  # type: ignore[operator]
        self._proc.wait(timeout=20)
        log = open(self.logfile, "ab")
        argv = [str(self.bindir / "postgres"), "-D", str(self.datadir)]
        if self._owner is not None:
            argv = ["runuser", "-u", self._owner.pw_name, "--", *argv]
        self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready()

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------------------
    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        return (
            f"host={self.host} port={self.port} dbname={dbname} "
            f"user={user or self.superuser} password={password or self.password}"
        )

    def psql(self, sql: str, dbname: str = "postgres", check: bool = True) -> str:
        """Run SQL as the superuser with psql and return its unaligned output."""
        env = {**os.environ, "PGPASSWORD": self.password}
        res = subprocess.run(
            [
                str(self.bindir / "psql") if (self.bindir and (self.bindir / "psql").exists()) else "psql",
                "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", self.host, "-p", str(self.port), "-U", self.superuser, "-d", dbname,
                "-c", sql,
            ],
            capture_output=True,
            env=env,
            check=False,
        )
        if check and res.returncode != 0:
            raise EmbeddedPostgresError(f"psql failed: {res.stderr.decode(errors='replace')}")
        return res.stdout.decode()

    def log_position(self) -> int:
        """A mark in the server log; pass it to statements_since()."""
        return self.logfile.stat().st_size

    def log_since(self, mark: int) -> str:
        with open(self.logfile, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")
