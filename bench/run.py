#!/usr/bin/env python3
"""pgbench -S through direct PostgreSQL, PgBouncer and pgwarden, interleaved in one run.

Why one run and interleaved: on a small shared machine the noise (other processes, CPU
frequency, page cache) drifts over minutes. Running every target once per round, in a rotating
order, makes that drift hit all targets alike, so the *ratios* are trustworthy even when the
absolute figures wander. Medians over rounds drop the odd outlier.

    python bench/run.py [--quick] [--duration S] [--clients N] [--scale N] [--rounds N]
                        [--policy FILE ...] [--full [--parts]] [--compiled] [--proxy-python PATH]
                        [--output PATH]

`--full` adds the configuration a user runs in production: "pgwarden+full" (AccessPolicy,
MaskingRule with columns and detectors, audit log with `durability: write`, session
recordings) and "pgwarden+full-fsync" (the same with `durability: fsync`).

`--parts` (with `--full`) adds the fully loaded target without each part in turn:
"pgwarden+full-no-audit", "-no-recording" and "-no-masking", and without both records
("pgwarden+full-no-audit-no-recording": what the proxy would reach if writing a statement's
records cost nothing), interleaved with the rest, so what each part costs end to end is measured
in the same run as the whole.

`--compiled` builds this checkout's wheel (setup.py: the hot modules compiled with mypyc) into a
temporary folder and runs every pgwarden target from it; with `--full` it adds
"pgwarden+full-pure", the same build and configuration with PGWARDEN_PURE_PYTHON=1, so both builds
are measured in one run. Without it the proxies run the installed package (an editable checkout
is pure Python).

`--proxy-python PATH` runs the pgwarden targets on another interpreter, in a virtual
environment made for it as the proxy image makes its own (requirements/install-venv.sh: the pins
of requirements/proxy.lock, then this checkout's wheel, built by that interpreter; compiled with
`--compiled`). The interpreter's build counts: the image's (the official python image) is built
with profile-guided and link-time optimization, a pyenv or plain `./configure` build is not, and
the same proxy costs measurably more CPU on the latter (docs/benchmarks.md). With `--full` the
run adds "pgwarden+full-bench-python", the fully loaded proxy on the bench's own interpreter, so
both are measured in one run. The results name each interpreter and how it was built.

A throw-away PostgreSQL (pgwarden.embedded) is started unless PGWARDEN_BENCH_DSN names a
server to use (a superuser libpq DSN, key=value or postgres:// URL). Everything started here
is stopped in `finally` blocks; all ports are on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

from pgwarden.embedded import EmbeddedPostgres, free_port
from pgwarden.k8s.names import API_VERSION

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = BENCH_DIR / "results" / "latest.json"
BENCH_DB = "bench"
BENCH_USER = "bench"
BENCH_PASSWORD = "bench-pw-not-secret"
AGENT_USER = "agent"
AGENT_PASSWORD = "agent-pw"
PGBOUNCER = os.environ.get("PGWARDEN_BENCH_PGBOUNCER") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
MODES = ("simple", "prepared")


class BenchError(RuntimeError):
    """A component of the benchmark could not be set up; the message says which and why."""


# -- settings ---------------------------------------------------------------------------------
@dataclass
class Settings:
    duration: int = 10  # pgbench -T takes whole seconds
    clients: int = 8
    jobs: int = 2
    scale: int = 10
    rounds: int = 3
    warmup: int = 2
    modes: tuple[str, ...] = MODES
    policy_files: list[Path] = field(default_factory=list)
    output: Path = DEFAULT_OUTPUT
    quick: bool = False
    py_spy: Path | None = None
    full: bool = False
    compiled: bool = False
    parts: bool = False
    proxy_python: Path | None = None


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per target, 1 round, scale 1, no warm-up")
    p.add_argument("--duration", type=int, help="seconds per pgbench run (default 10; 2 with --quick)")
    p.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j (default 2)")
    p.add_argument("--scale", type=int, help="pgbench -i -s (default 10; 1 with --quick)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; 1 with --quick)")
    p.add_argument("--warmup", type=int, help="seconds of untimed pgbench per target first (default 2)")
    p.add_argument("--mode", action="append", choices=MODES, help="only this pgbench -M mode (repeatable)")
    p.add_argument("--policy", action="append", type=Path, default=[], metavar="FILE",
                   help="YAML documents (e.g. an AccessPolicy for connection 'bench') appended to the proxy "
                        "config; adds a 'pgwarden+policy' target")
    p.add_argument("--full", action="store_true",
                   help="add pgwarden+full (policy, masking, audit durability write, recordings) and "
                        "pgwarden+full-fsync (the same with audit durability fsync)")
    p.add_argument("--compiled", action="store_true",
                   help="run the pgwarden targets from a compiled wheel of this checkout, built first (about two "
                        "minutes); with --full also pgwarden+full-pure, that build with PGWARDEN_PURE_PYTHON=1")
    p.add_argument("--parts", action="store_true",
                   help="with --full: also pgwarden+full without each part in turn (pgwarden+full-no-audit, "
                        "-no-recording, -no-masking) and without both records (-no-audit-no-recording), "
                        "interleaved with the rest: what each part costs end to end")
    p.add_argument("--proxy-python", type=Path, metavar="PATH",
                   help="run the pgwarden targets on this interpreter (e.g. /usr/bin/python3.11), in a virtual "
                        "environment made as the proxy image makes its own; with --full also pgwarden+full on the "
                        "bench's own interpreter (pgwarden+full-bench-python)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON results (default {DEFAULT_OUTPUT})")
    p.add_argument("--py-spy", type=Path, metavar="FILE",
                   help="profile the pgwarden proxy (the +policy one when --policy is given) with py-spy for the "
                        "whole run: FILE.svg = flame graph, "
                        "FILE.txt = collapsed stacks, FILE.json = speedscope")
    a = p.parse_args(argv)
    if a.parts and not a.full:
        p.error("--parts takes the fully loaded target apart: give --full with it")
    q = a.quick
    return Settings(
        duration=a.duration or (2 if q else 10),
        clients=a.clients,
        jobs=a.jobs,
        scale=a.scale or (1 if q else 10),
        rounds=a.rounds or (1 if q else 3),
        warmup=a.warmup if a.warmup is not None else (0 if q else 2),
        modes=tuple(a.mode) if a.mode else MODES,
        policy_files=a.policy,
        output=a.output,
        quick=q,
        py_spy=a.py_spy,
        full=a.full,
        compiled=a.compiled,
        parts=a.parts,
        proxy_python=a.proxy_python,
    )


# -- the server -------------------------------------------------------------------------------
@dataclass
class Server:
    """Where PostgreSQL listens and how to reach it as a superuser (for setup only)."""

    host: str
    port: int
    superuser: str
    password: str
    version: str = ""

    def env(self, user: str, password: str) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": password, "PGUSER": user, "PGSSLMODE": "disable"}

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        res = subprocess.run(
            ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.host, "-p", str(self.port),
             "-d", dbname, "-c", sql],
            capture_output=True, text=True, env=self.env(self.superuser, self.password), check=False,
        )
        if res.returncode != 0:
            raise BenchError(f"psql failed on {sql[:60]!r}: {res.stderr.strip()}")
        return res.stdout.strip()


def parse_dsn(dsn: str) -> dict[str, str]:
    """libpq key=value or postgres:// URL → dict (enough for host/port/user/password)."""
    if dsn.startswith(("postgres://", "postgresql://")):
        u = urlparse(dsn)
        out = {"host": u.hostname or "127.0.0.1", "port": str(u.port or 5432)}
        if u.username:
            out["user"] = unquote(u.username)
        if u.password:
            out["password"] = unquote(u.password)
        return out
    return dict(tok.split("=", 1) for tok in dsn.split() if "=" in tok)


@contextlib.contextmanager
def postgres() -> Iterator[Server]:
    """The server under test: PGWARDEN_BENCH_DSN's, or a throw-away one tuned for benchmarking."""
    dsn = os.environ.get("PGWARDEN_BENCH_DSN")
    if dsn:
        d = parse_dsn(dsn)
        yield Server(d.get("host", "127.0.0.1"), int(d.get("port", "5432")), d.get("user", "postgres"),
                     d.get("password", os.environ.get("PGPASSWORD", "")))
        return
    # The fixture logs every statement (tests read the log); a benchmark must not.
    pg = EmbeddedPostgres(settings={"log_statement": "'none'", "max_connections": "100"})
    try:
        pg.start()
        yield Server(pg.host, pg.port, pg.superuser, pg.password)
    finally:
        pg.stop()


def prepare_database(srv: Server, scale: int) -> None:
    """A dedicated login role and database, populated by `pgbench -i` directly (no proxy)."""
    srv.version = srv.psql("SHOW server_version")
    srv.psql(f"DROP DATABASE IF EXISTS {BENCH_DB}")
    srv.psql(f"DROP ROLE IF EXISTS {BENCH_USER}")
    srv.psql(f"CREATE ROLE {BENCH_USER} LOGIN PASSWORD '{BENCH_PASSWORD}'")
    srv.psql(f"CREATE DATABASE {BENCH_DB} OWNER {BENCH_USER}")
    res = subprocess.run(
        ["pgbench", "-i", "-q", "-s", str(scale), "-h", srv.host, "-p", str(srv.port), BENCH_DB],
        capture_output=True, text=True, env=srv.env(BENCH_USER, BENCH_PASSWORD), check=False,
    )
    if res.returncode != 0:
        raise BenchError(f"pgbench -i failed: {res.stderr.strip()[-2000:]}")


# -- helper processes -------------------------------------------------------------------------
def service_user() -> pwd.struct_passwd | None:
    """PgBouncer refuses to run as root; under root it runs as `postgres` (as the server does)."""
    if os.geteuid() != 0:
        return None
    return pwd.getpwnam("postgres")


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 20) -> None:
    """Block until something accepts on 127.0.0.1:port, or fail with the tail of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited at start (rc={proc.returncode}): {tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s: {tail(log)}")


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process group we created (runuser + child), then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@dataclass
class Target:
    """One way to reach the bench database: pgbench connects here with these credentials."""

    name: str
    port: int
    user: str
    password: str
    pid: int | None = None
    build: str = ""  # a pgwarden proxy's: compiled (mypyc) or pure Python


def pgbouncer_config(workdir: Path, srv: Server, port: int) -> Path:
    """Session mode, SCRAM both ways (client→bouncer from auth_file, bouncer→server)."""
    userlist = workdir / "userlist.txt"
    userlist.write_text(f'"{BENCH_USER}" "{BENCH_PASSWORD}"\n')
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"{BENCH_DB} = host={srv.host} port={srv.port} dbname={BENCH_DB}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "pool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 50\n"
        f"auth_type = scram-sha-256\nauth_file = {userlist}\n"
        f"logfile = {workdir / 'pgbouncer.log'}\n"
        "log_connections = 0\nlog_disconnections = 0\n"
        "ignore_startup_parameters = extra_float_digits\n"
    )
    return ini


@contextlib.contextmanager
def pgbouncer(srv: Server) -> Iterator[Target]:
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-bench-bouncer-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        port = free_port()
        ini = pgbouncer_config(workdir, srv, port)
        argv = [PGBOUNCER, str(ini)]
        owner = service_user()
        if owner is not None:
            for p in (workdir, *workdir.iterdir()):
                os.chown(p, owner.pw_uid, owner.pw_gid)
            argv = ["runuser", "-u", owner.pw_name, "--", *argv]
        out = open(workdir / "stdout.log", "wb")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        wait_port(port, proc, workdir / "pgbouncer.log", "pgbouncer")
        yield Target("pgbouncer", port, BENCH_USER, BENCH_PASSWORD, proc.pid)
    finally:
        stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


POLICY_DOCUMENT = BENCH_DIR / "policy-select.yaml"
MASKING_DOCUMENT = BENCH_DIR / "masking-full.yaml"
FULL_DOCUMENTS = [POLICY_DOCUMENT, MASKING_DOCUMENT]


# what --parts leaves out of the fully loaded target: each part in turn, then both records
# together (the bound on what a cheaper way of writing them could buy)
PARTS: tuple[tuple[str, ...], ...] = (("audit",), ("recording",), ("masking",), ("audit", "recording"))


def full_spec(workdir: Path, durability: str, without: tuple[str, ...] = ()) -> dict[str, object]:
    """ProxyConfig settings of the fully loaded targets: audit log and session recordings on
    (less the parts in `without`)."""
    spec: dict[str, object] = {"audit": {"path": str(workdir / "audit.jsonl"), "durability": durability},
                               "recording": {"enabled": True, "dir": str(workdir / "recordings")}}
    return {k: v for k, v in spec.items() if k not in without}


def full_documents(without: tuple[str, ...] = ()) -> list[Path]:
    """The AccessPolicy and MaskingRule of the fully loaded targets (less the MaskingRule if
    `without` names masking)."""
    return [f for f in FULL_DOCUMENTS if not ("masking" in without and f == MASKING_DOCUMENT)]


@dataclass(frozen=True)
class FullTarget:
    """One fully loaded proxy the run starts: its name, audit durability, the parts it goes
    without, and what its environment adds (PYTHONPATH of a compiled build, PGWARDEN_PURE_PYTHON)."""

    name: str
    durability: str
    without: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable  # the interpreter it runs on


def full_targets(s: Settings, env: dict[str, str], python: str = sys.executable,
                 bench_env: dict[str, str] | None = None) -> list[FullTarget]:
    """The fully loaded targets `s` asks for, in the order they are started. `python` and `env`:
    the proxies' interpreter and environment; `bench_env`: the bench's own interpreter's (for
    pgwarden+full-bench-python, with --proxy-python)."""
    if not s.full:
        return []
    targets = [FullTarget("pgwarden+full", "write", env=env, python=python)]
    if s.proxy_python is not None:
        targets.append(FullTarget("pgwarden+full-bench-python", "write", env=bench_env or {}))
    if s.compiled:
        targets.append(FullTarget("pgwarden+full-pure", "write", env={**env, "PGWARDEN_PURE_PYTHON": "1"},
                                  python=python))
    targets.append(FullTarget("pgwarden+full-fsync", "fsync", env=env, python=python))
    if s.parts:
        targets += [FullTarget("pgwarden+full" + "".join(f"-no-{p}" for p in parts), "write", parts, env, python)
                    for parts in PARTS]
    return targets


def proxy_documents(srv: Server, port: int, extra: list[Path], spec: dict[str, object] | None = None) -> str:
    """The YAML of tests/fix_proxy.py's default proxy, aimed at the bench database."""
    api = API_VERSION
    docs: list[dict[str, object]] = [
        {"apiVersion": api, "kind": "DatabaseConnection", "metadata": {"name": BENCH_DB},
         "spec": {"host": srv.host, "port": srv.port, "database": BENCH_DB, "sslMode": "disable"}},
        {"apiVersion": api, "kind": "ProxyConfig", "metadata": {"name": "bench"},
         "spec": {"connectionRef": {"name": BENCH_DB}, "listen": {"host": "127.0.0.1", "port": port},
                  "upstream": {"username": BENCH_USER, "password": BENCH_PASSWORD},
                  "users": [{"name": AGENT_USER, "password": AGENT_PASSWORD, "groups": ["ai-agents"]}],
                  "defaultAction": "allow", **(spec or {})}},
    ]
    text = yaml.safe_dump_all(docs, sort_keys=False)
    for f in extra:
        text += "---\n" + f.read_text()
    return text


def pip(command: str, *args: str, env: dict[str, str] | None = None, python: str = "") -> None:
    """`pip COMMAND -q --no-deps ARGS`, run by this interpreter's pip for `python` (default: this one)."""
    argv = [sys.executable, "-m", "pip", *(("--python", python) if python else ()), command, "-q", "--no-deps", *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise BenchError(f"pip {command} failed: {done.stderr[-2000:]}")


@contextlib.contextmanager
def compiled_build() -> Iterator[Path]:
    """This checkout's wheel, built with its hot modules compiled, installed into a temporary folder
    (put first on the proxies' PYTHONPATH). Fails rather than measure a pure build by mistake."""
    folder = Path(tempfile.mkdtemp(prefix="pgwarden-bench-build-"))
    try:
        print("building the compiled wheel (setup.py, mypyc) ...", flush=True)
        pip("wheel", "--no-build-isolation", "-w", str(folder / "wheel"), str(BENCH_DIR.parent),
            env={"PGWARDEN_COMPILE": "require"})  # fails rather than build pure Python
        pip("install", "--target", str(folder / "site"), *map(str, (folder / "wheel").glob("pgwarden-*.whl")))
        yield folder / "site"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def proxy_environment(python: Path, compiled: bool) -> Iterator[str]:
    """A virtual environment on `python` made as the proxy image makes its own
    (requirements/install-venv.sh): requirements/proxy.lock's pins, then this checkout's wheel
    built by that interpreter (with its hot modules compiled if `compiled`; build isolation, as
    the image's builder stage builds). Yields the environment's interpreter."""
    if not os.access(python, os.X_OK):
        raise BenchError(f"--proxy-python {python}: not an executable interpreter")
    folder = Path(tempfile.mkdtemp(prefix="pgwarden-bench-python-"))
    try:
        venv = folder / "venv"
        done = subprocess.run([str(python), "-m", "venv", "--without-pip", str(venv)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"--proxy-python {python}: cannot make a virtual environment "
                             f"(Debian: apt-get install python3-venv): {done.stderr.strip()[-500:]}")
        py = str(venv / "bin" / "python")
        print(f"a virtual environment on {python} (requirements/proxy.lock, this checkout's wheel) ...", flush=True)
        pip("install", "--only-binary=:all:", "-r", str(BENCH_DIR.parent / "requirements" / "proxy.lock"),
            python=py)
        pip("wheel", "-w", str(folder / "wheel"), str(BENCH_DIR.parent),
            env={"PGWARDEN_COMPILE": "require" if compiled else "0"}, python=py)  # fails rather than build pure Python
        pip("install", *map(str, (folder / "wheel").glob("pgwarden-*.whl")), python=py)
        yield py
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def interpreter(python: str) -> dict[str, object]:
    """What an interpreter is and how it was built: its version, whether it runs from a shared
    libpython (read from the process's own mappings: Debian builds one but links its executable
    statically), and the optimizations its configure line asked for (a distribution may build with
    them without saying so there: Debian's python3.11 is built with PGO and LTO, its changelog says)."""
    probe = ("import json, os, platform, sys, sysconfig; args = sysconfig.get_config_var('CONFIG_ARGS') or ''; "
             "maps = '/proc/self/maps'; shared = 'libpython' in open(maps).read() if os.path.exists(maps) else None; "
             "print(json.dumps({'version': platform.python_version(), 'base': sys.base_prefix, "
             "'shared_libpython': shared, "
             "'configure_pgo': '--enable-optimizations' in args, 'configure_lto': '--with-lto' in args}))")
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"{python} does not run: {done.stderr.strip()[-500:]}")
    return {"path": python, **json.loads(done.stdout)}


def proxy_build(log: Path, timeout: float = 10) -> str:
    """What a started proxy says it runs ('compiled (mypyc)' or 'pure Python'), from its log."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(r"\(hot path: (.+)\)$", log.read_text(errors="replace"), re.M)
        if m or time.monotonic() > deadline:
            return m.group(1) if m else "unknown (no start-up line in the proxy's log)"
        time.sleep(0.05)


@contextlib.contextmanager
def pgwarden_proxy(srv: Server, name: str, extra: list[Path], durability: str | None = None,
                   env: dict[str, str] | None = None, without: tuple[str, ...] = (),
                   python: str = sys.executable) -> Iterator[Target]:
    """`python -m pgwarden.cli proxy --config FILE` in its own process, as deployed (uvloop), on
    `python`. `durability`: fully loaded (audit with that durability, recordings, less the parts in
    `without`). `env`: added to its environment (PYTHONPATH of a compiled build, PGWARDEN_PURE_PYTHON)."""
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-bench-proxy-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        port = free_port()
        cfg = workdir / "proxy.yaml"
        cfg.write_text(proxy_documents(srv, port, extra, full_spec(workdir, durability, without) if durability else None))
        log = workdir / "proxy.log"
        out = open(log, "wb")
        # cwd: `-m` puts it first on sys.path, where a checkout's pgwarden would shadow a build's
        proc = subprocess.Popen([python, "-m", "pgwarden.cli", "proxy", "--config", str(cfg)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir,
                                env={**os.environ, **(env or {})})
        out.close()
        wait_port(port, proc, log, name)
        yield Target(name, port, AGENT_USER, AGENT_PASSWORD, proc.pid, proxy_build(log))
    finally:
        stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None) -> Iterator[None]:
    """Sample the proxy while pgbench runs; idle time (waiting in epoll) is left out by py-spy."""
    if out is None:
        yield
        return
    exe = shutil.which("py-spy")
    if exe is None:
        raise BenchError("--py-spy needs py-spy (pip install py-spy)")
    fmt = {".svg": "flamegraph", ".txt": "raw", ".json": "speedscope"}.get(out.suffix, "raw")
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--format", fmt, "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"py-spy profile of the proxy: {out}", flush=True)


# -- pgbench ----------------------------------------------------------------------------------
@dataclass
class Run:
    target: str
    mode: str
    round: int
    tps: float
    latency_avg_ms: float
    p50_ms: float
    p99_ms: float
    transactions: int
    failed: int
    # CPU the middle process (PgBouncer, the proxy) spent per transaction: immune to the
    # machine's noise in a way TPS is not, and the figure to compare Python with C by.
    cpu_us_per_tx: float | None = None
    # how much of one core the middle process group used (CPU seconds over wall seconds): its event
    # loop is one thread, so only its helper threads (such as the audit log's fsync and the analysis
    # of long statements) take it past 1.0; a middle near 1.0 while the machine idles is the bottleneck
    middle_cores: float | None = None
    # the whole machine during the run (/proc/stat, every CPU): the share busy, and the share the
    # hypervisor ran something else while a vCPU wanted to run (steal: a noisy host, in figures)
    machine_busy: float | None = None
    machine_steal: float | None = None


TPS_RE = re.compile(r"tps = ([\d.]+) \((?:without|excluding) initial connection")
LAT_RE = re.compile(r"latency average = ([\d.]+) ms")
TX_RE = re.compile(r"number of transactions actually processed: (\d+)")
FAIL_RE = re.compile(r"number of failed transactions: (\d+)")


def pgbench_argv(t: Target, mode: str, s: Settings, seconds: int, log_prefix: Path | None) -> list[str]:
    argv = ["pgbench", "-S", "-n", "-M", mode, "-c", str(s.clients), "-j", str(s.jobs), "-T", str(max(1, seconds)),
            "-h", "127.0.0.1", "-p", str(t.port), "-U", t.user]
    if log_prefix is not None:
        argv += ["-l", f"--log-prefix={log_prefix}"]
    return [*argv, BENCH_DB]


def run_pgbench(t: Target, mode: str, s: Settings, seconds: int, log_prefix: Path | None) -> str:
    env = {**os.environ, "PGPASSWORD": t.password, "PGSSLMODE": "disable"}
    res = subprocess.run(pgbench_argv(t, mode, s, seconds, log_prefix), capture_output=True, text=True,
                         env=env, check=False, timeout=seconds + 120)
    if res.returncode != 0:
        raise BenchError(f"pgbench -M {mode} against {t.name} failed (rc={res.returncode}): "
                         f"{(res.stderr or res.stdout).strip()[-1500:]}")
    return res.stdout


def latencies_us(prefix: Path) -> list[int]:
    """Per-transaction latencies from pgbench -l files (`client tx latency_us script epoch us`)."""
    out: list[int] = []
    for f in prefix.parent.glob(prefix.name + ".*"):
        with open(f) as fh:
            for line in fh:
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[2].isdigit():
                    out.append(int(parts[2]))
        f.unlink()
    return out


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile; exact enough with tens of thousands of samples."""
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return float(sorted_values[i])


def group_cpu_seconds(pgid: int | None) -> float | None:
    """user+system CPU of every process in the group we started (runuser and its child)."""
    if pgid is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[2]) == pgid:  # pgrp
                total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def proc_stat_cpu(text: str) -> tuple[int, int, int] | None:
    """(busy, steal, total) clock ticks of all CPUs from /proc/stat's aggregate `cpu` line (user
    nice system idle iowait irq softirq steal; guest time is already inside user)."""
    first = text.split("\n", 1)[0].split()
    if len(first) < 6 or first[0] != "cpu":  # user nice system idle iowait at least (Linux 2.6 on)
        return None
    v = [int(x) for x in first[1:9]]
    idle = v[3] + v[4]
    steal = v[7] if len(v) > 7 else 0
    total = sum(v)
    return total - idle - steal, steal, total


def machine_shares(before: tuple[int, int, int] | None,
                   after: tuple[int, int, int] | None) -> tuple[float | None, float | None]:
    """The machine's busy and stolen shares of all CPU time between two `proc_stat_cpu` readings."""
    if before is None or after is None or after[2] <= before[2]:
        return None, None
    total = after[2] - before[2]
    return round((after[0] - before[0]) / total, 3), round((after[1] - before[1]) / total, 3)


def machine_cpu() -> tuple[int, int, int] | None:
    try:
        return proc_stat_cpu(Path("/proc/stat").read_text())
    except (OSError, ValueError):
        return None


def measure(t: Target, mode: str, rnd: int, s: Settings, logdir: Path) -> Run:
    prefix = logdir / f"{t.name}-{mode}-{rnd}".replace("+", "_")
    cpu0, machine0, wall0 = group_cpu_seconds(t.pid), machine_cpu(), time.monotonic()
    out = run_pgbench(t, mode, s, s.duration, prefix)
    cpu1, machine1, wall = group_cpu_seconds(t.pid), machine_cpu(), time.monotonic() - wall0
    lat = sorted(latencies_us(prefix))

    def grab(rx: re.Pattern[str], default: str = "0") -> str:
        mt = rx.search(out)
        return mt.group(1) if mt else default

    tx = int(grab(TX_RE))
    cpu = round((cpu1 - cpu0) * 1e6 / tx, 1) if cpu0 is not None and cpu1 is not None and tx else None
    cores = round((cpu1 - cpu0) / wall, 3) if cpu0 is not None and cpu1 is not None and wall > 0 else None
    busy, steal = machine_shares(machine0, machine1)
    return Run(
        target=t.name, mode=mode, round=rnd, tps=float(grab(TPS_RE)), latency_avg_ms=float(grab(LAT_RE)),
        p50_ms=percentile(lat, 0.50) / 1000, p99_ms=percentile(lat, 0.99) / 1000,
        transactions=tx, failed=int(grab(FAIL_RE)), cpu_us_per_tx=cpu, middle_cores=cores,
        machine_busy=busy, machine_steal=steal,
    )


def schedule(targets: list[Target], modes: tuple[str, ...], rounds: int) -> list[tuple[int, str, Target]]:
    """Round-robin over targets, rotating the starting target each round so none is always first."""
    plan = []
    for r in range(rounds):
        for mode in modes:
            k = r % len(targets)
            for t in targets[k:] + targets[:k]:
                plan.append((r + 1, mode, t))
    return plan


def benchmark(targets: list[Target], s: Settings) -> list[Run]:
    logdir = Path(tempfile.mkdtemp(prefix="pgwarden-bench-log-"))
    try:
        if s.warmup > 0:
            for t in targets:
                run_pgbench(t, "simple", s, s.warmup, None)
        runs = []
        for rnd, mode, t in schedule(targets, s.modes, s.rounds):
            r = measure(t, mode, rnd, s, logdir)
            cpu = f"  {r.cpu_us_per_tx:.1f} CPU us/tx" if r.cpu_us_per_tx is not None else ""
            print(f"  round {rnd} {mode:8} {t.name:16} {r.tps:10.0f} tps  p50 {r.p50_ms:.3f} ms  "
                  f"p99 {r.p99_ms:.3f} ms{cpu}", flush=True)
            runs.append(r)
        return runs
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


# -- report -----------------------------------------------------------------------------------
def summarize(runs: list[Run]) -> dict[str, dict[str, dict[str, float]]]:
    """target → mode → medians over rounds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in runs:
        out.setdefault(r.target, {}).setdefault(r.mode, {})
    for target, modes in out.items():
        for mode in modes:
            rs = [r for r in runs if r.target == target and r.mode == mode]
            modes[mode] = {
                "tps": statistics.median(r.tps for r in rs),
                "p50_ms": statistics.median(r.p50_ms for r in rs),
                "p99_ms": statistics.median(r.p99_ms for r in rs),
                "latency_avg_ms": statistics.median(r.latency_avg_ms for r in rs),
                "rounds": len(rs),
            }
            for key in ("cpu_us_per_tx", "middle_cores", "machine_busy", "machine_steal"):
                values = [v for v in (getattr(r, key) for r in rs) if v is not None]
                if values:
                    modes[mode][key] = statistics.median(values)
    return out


def ratios(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Each pgwarden target's median TPS over PgBouncer's and over direct, per mode."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for target, modes in summary.items():
        if not target.startswith("pgwarden"):
            continue
        for mode, v in modes.items():
            for base in ("pgbouncer", "direct"):
                b = summary.get(base, {}).get(mode, {}).get("tps")
                if b:
                    out.setdefault(target, {}).setdefault(mode, {})[f"vs_{base}"] = round(v["tps"] / b, 3)
    return out


def round_ratios(runs: list[Run]) -> dict[str, dict[str, list[float]]]:
    """Each pgwarden target's TPS over PgBouncer's in the same round, round by round: the spread
    the medians hide (a round on a busy host moves every target, so its ratio still counts)."""
    bouncer = {(r.mode, r.round): r.tps for r in runs if r.target == "pgbouncer"}
    out: dict[str, dict[str, list[float]]] = {}
    for r in sorted(runs, key=lambda r: r.round):
        b = bouncer.get((r.mode, r.round))
        if r.target.startswith("pgwarden") and b:
            out.setdefault(r.target, {}).setdefault(r.mode, []).append(round(r.tps / b, 3))
    return out


def table(summary: dict[str, dict[str, dict[str, float]]], rat: dict[str, dict[str, dict[str, float]]]) -> str:
    w = max([16, *map(len, summary)])
    lines = [f"{'target':{w}} {'mode':9} {'TPS':>9} {'p50 ms':>8} {'p99 ms':>8} {'/pgbouncer':>11} {'/direct':>8} "
             f"{'CPU us/tx':>10} {'cores':>6} {'machine':>8}"]
    for target, modes in summary.items():
        for mode, v in modes.items():
            r = rat.get(target, {}).get(mode, {})
            vb = f"{r['vs_pgbouncer']:.2f}x" if "vs_pgbouncer" in r else ""
            vd = f"{r['vs_direct']:.2f}x" if "vs_direct" in r else ""
            cpu = f"{v['cpu_us_per_tx']:.1f}" if "cpu_us_per_tx" in v else ""
            cores = f"{v['middle_cores']:.2f}" if "middle_cores" in v else ""
            machine = f"{100 * v['machine_busy']:.0f}%" if "machine_busy" in v else ""
            lines.append(f"{target:{w}} {mode:9} {v['tps']:9.0f} {v['p50_ms']:8.3f} {v['p99_ms']:8.3f} {vb:>11} {vd:>8} "
                         f"{cpu:>10} {cores:>6} {machine:>8}")
    return "\n".join(lines)


def versions(srv: Server) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        with contextlib.suppress(OSError):
            return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.splitlines()[0]
        return ""

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    return {"postgresql": srv.version, "pgbouncer": first_line([PGBOUNCER, "--version"]),
            "pgbench": first_line(["pgbench", "--version"]), "python": platform.python_version(), "uvloop": uv}


def source_revision() -> str:
    """The commit measured, with `+dirty` when proxy/ has uncommitted changes (they are measured too)."""
    def git(*args: str) -> str:
        with contextlib.suppress(OSError):
            return subprocess.run(["git", *args], cwd=BENCH_DIR.parent, capture_output=True, text=True,
                                  check=False).stdout.strip()
        return ""

    rev = git("rev-parse", "--short", "HEAD")
    return rev + ("+dirty" if rev and git("status", "--porcelain", "--", "proxy") else "")


def write_json(path: Path, s: Settings, srv: Server, runs: list[Run], notes: dict[str, str],
               load_before: tuple[float, float, float], builds: dict[str, str] | None = None,
               interpreters: dict[str, dict[str, object]] | None = None) -> dict[str, object]:
    summary = summarize(runs)
    doc: dict[str, object] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
        "revision": source_revision(),
        # other work on the machine shows up here; the interleaving keeps the ratios fair anyway
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": versions(srv),
        "builds": builds or {},  # what the pgwarden targets ran: compiled (mypyc) or pure Python
        # the interpreters they ran on, and how each was built: "proxies" (all pgwarden targets
        # but -bench-python) and "bench" (this script's, and pgwarden+full-bench-python's)
        "interpreters": interpreters or {},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()
                     if k not in ("policy_files", "output")} | {"policy_files": [str(p) for p in s.policy_files]},
        "summary": summary,
        "ratios": ratios(summary),
        "round_ratios": round_ratios(runs),
        "notes": notes,
        "runs": [asdict(r) for r in runs],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return doc


# -- main -------------------------------------------------------------------------------------
def check_tools() -> None:
    missing = [t for t in ("pgbench", "psql") if shutil.which(t) is None]
    if not (os.path.exists(PGBOUNCER) or shutil.which(PGBOUNCER)):
        missing.append("pgbouncer")
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (apt-get install postgresql-client "
                         "postgresql-contrib pgbouncer; .ci/run does this)")


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    try:
        check_tools()
        with contextlib.ExitStack() as stack:
            srv = stack.enter_context(postgres())
            print(f"PostgreSQL on 127.0.0.1:{srv.port}; pgbench -i -s {s.scale} ...", flush=True)
            prepare_database(srv, s.scale)
            env: dict[str, str] = {}
            if s.compiled and (s.proxy_python is None or s.full):  # the bench's interpreter runs a proxy
                site = stack.enter_context(compiled_build())
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
            bench_env, python = env, sys.executable
            if s.proxy_python is not None:
                python = stack.enter_context(proxy_environment(s.proxy_python, s.compiled))
                env = {}  # its own environment holds this checkout's build
            interpreters = {"proxies": interpreter(python), "bench": interpreter(sys.executable)}
            print(f"the proxies' interpreter: {interpreters['proxies']}", flush=True)
            warden = stack.enter_context(pgwarden_proxy(srv, "pgwarden", [], env=env, python=python))
            targets = [Target("direct", srv.port, BENCH_USER, BENCH_PASSWORD),
                       stack.enter_context(pgbouncer(srv)), warden]
            notes: dict[str, str] = {}
            if s.policy_files:
                try:
                    targets.append(stack.enter_context(pgwarden_proxy(srv, "pgwarden+policy", s.policy_files, env=env,
                                                                      python=python)))
                except BenchError as e:  # the policy engine may not accept it yet; report, go on
                    notes["pgwarden+policy"] = str(e)
                    print(f"skipping pgwarden+policy: {e}", file=sys.stderr)
            for full in full_targets(s, env, python, bench_env):
                try:
                    targets.append(stack.enter_context(pgwarden_proxy(
                        srv, full.name, full_documents(full.without), full.durability, full.env, full.without,
                        full.python)))
                except BenchError as e:
                    notes[full.name] = str(e)
                    print(f"skipping {full.name}: {e}", file=sys.stderr)
            print(f"targets: {', '.join(f'{t.name}:{t.port}' for t in targets)}; pgbench -S -c {s.clients} "
                  f"-j {s.jobs} -T {s.duration}, {s.rounds} round(s), modes {', '.join(s.modes)}", flush=True)
            # the most loaded proxy is the one to look into
            profiled = next((t for t in targets if t.name == "pgwarden+full"), targets[-1])
            assert profiled.pid is not None
            load_before = os.getloadavg()
            with py_spy(profiled.pid, s.py_spy):
                runs = benchmark(targets, s)
            builds = {t.name: t.build for t in targets if t.build}
            print(f"builds: {builds}", flush=True)
            doc = write_json(s.output, s, srv, runs, notes, load_before, builds, interpreters)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    print()
    print(table(doc["summary"], doc["ratios"]))  # type: ignore[arg-type]
    by_round: dict[str, dict[str, list[float]]] = doc["round_ratios"]  # type: ignore[assignment]
    for target, modes in by_round.items():
        for mode, values in modes.items():
            print(f"{target} {mode}: round by round {', '.join(f'{v:.2f}x' for v in values)} PgBouncer's TPS")
    print(f"\nresults: {s.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
