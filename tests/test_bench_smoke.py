"""bench/run.py --quick end to end: direct, PgBouncer and pgwarden all serve pgbench -S.

Why a smoke test: the benchmark is run by hand, rarely, so it rots silently (a changed CLI flag,
a config key the proxy now rejects, pgbench output that no longer parses). This keeps it
runnable; it says nothing about speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
PGBOUNCER = os.environ.get("PGWARDEN_BENCH_PGBOUNCER") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@pytest.mark.slow
def test_bench_quick_run(tmp_path: Path) -> None:
    if not os.path.exists(PGBOUNCER):
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)")
    if shutil.which("pgbench") is None:
        pytest.skip("pgbench is not installed (apt-get install postgresql-contrib)")
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "PGWARDEN_BENCH_DSN"}
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--duration", "1", "--output", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads(out.read_text())
    for target in ("direct", "pgbouncer", "pgwarden"):
        for mode in ("simple", "prepared"):
            assert doc["summary"][target][mode]["tps"] > 0, (target, mode, doc["summary"])
            assert doc["summary"][target][mode]["p99_ms"] > 0, (target, mode)
    assert set(doc["ratios"]["pgwarden"]["simple"]) == {"vs_pgbouncer", "vs_direct"}
    assert "pgwarden" in res.stdout and "/pgbouncer" in res.stdout
    # how loaded the middle process and the machine were, for every run that has a middle
    for target in ("pgbouncer", "pgwarden"):
        v = doc["summary"][target]["simple"]
        assert 0 < v["middle_cores"] <= 1.2, v  # one event loop: at most one core (and tick rounding)
        assert 0 < v["machine_busy"] <= 1 and 0 <= v["machine_steal"] < 1, v
    assert "cores" in res.stdout and "machine" in res.stdout


def load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_parts_takes_the_fully_loaded_target_apart_one_part_at_a_time(tmp_path: Path) -> None:
    """`--full --parts`: the whole, the whole without each part, and without both records, in one
    interleaved run; each target's configuration lacks exactly the parts its name says and keeps
    the others."""
    run = load_runner()
    with pytest.raises(SystemExit):
        run.parse_args(["--parts"])  # nothing to take apart without --full
    s = run.parse_args(["--full", "--parts", "--compiled"])
    targets = {t.name: t for t in run.full_targets(s, {"PYTHONPATH": "/build"})}
    assert list(targets) == ["pgwarden+full", "pgwarden+full-pure", "pgwarden+full-fsync", "pgwarden+full-no-audit",
                             "pgwarden+full-no-recording", "pgwarden+full-no-masking",
                             "pgwarden+full-no-audit-no-recording"]
    assert all(t.env["PYTHONPATH"] == "/build" for t in targets.values())
    assert targets["pgwarden+full-pure"].env["PGWARDEN_PURE_PYTHON"] == "1"
    assert "PGWARDEN_PURE_PYTHON" not in targets["pgwarden+full-no-audit"].env
    for name, kept in (("pgwarden+full", {"audit", "recording", "masking"}),
                       ("pgwarden+full-no-audit", {"recording", "masking"}),
                       ("pgwarden+full-no-recording", {"audit", "masking"}),
                       ("pgwarden+full-no-masking", {"audit", "recording"}),
                       ("pgwarden+full-no-audit-no-recording", {"masking"})):
        t = targets[name]
        spec = run.full_spec(tmp_path, t.durability, t.without)
        docs = [p.name for p in run.full_documents(t.without)]
        has = {part for part in ("audit", "recording") if part in spec}
        has |= {"masking"} if "masking-full.yaml" in docs else set()
        assert has == kept, name
        assert "policy-select.yaml" in docs, name  # the AccessPolicy stays in every one
    assert run.full_targets(run.parse_args(["--full"]), {})[-1].name == "pgwarden+full-fsync"
    assert run.full_targets(run.parse_args([]), {}) == []


def test_round_ratios_pair_each_run_with_pgbouncers_run_of_the_same_round_and_mode() -> None:
    run = load_runner()

    def r(target: str, mode: str, rnd: int, tps: float) -> object:
        return run.Run(target, mode, rnd, tps, 0.1, 0.1, 0.2, int(tps), 0)

    runs = [r("pgbouncer", "simple", 2, 200.0), r("pgwarden+full", "simple", 2, 120.0),
            r("pgbouncer", "simple", 1, 100.0), r("pgwarden+full", "simple", 1, 58.0),
            r("pgwarden+full", "prepared", 1, 50.0), r("direct", "simple", 1, 300.0)]
    assert run.round_ratios(runs) == {"pgwarden+full": {"simple": [0.58, 0.6]}}  # prepared: no PgBouncer run


def test_the_machine_share_is_read_from_proc_stat_as_the_kernel_counts_it() -> None:
    run = load_runner()
    # user nice system idle iowait irq softirq steal guest guest_nice (proc(5)); guest is in user
    before = run.proc_stat_cpu("cpu  1000 0 500 8000 100 0 50 200 40 0\ncpu0 500 0 250 4000 50 0 25 100 20 0\n")
    after = run.proc_stat_cpu("cpu  1600 0 800 8500 100 0 100 400 90 0\n")
    assert before == (1550, 200, 9850)
    # 1650 ticks passed: 950 busy (user 600, system 300, softirq 50), 500 idle, 200 stolen
    assert run.machine_shares(before, after) == (round(950 / 1650, 3), round(200 / 1650, 3))
    assert run.machine_shares(None, after) == (None, None)
    assert run.proc_stat_cpu("intr 1 2 3") is None and run.proc_stat_cpu("cpu 1 2 3 4") is None
    assert run.proc_stat_cpu(Path("/proc/stat").read_text()) is not None  # this machine's, parsed


def test_the_instruction_counter_drives_the_fully_loaded_session() -> None:
    """bench/instructions.py runs its round trips under valgrind; the driver it runs there must
    keep working (the session's configuration, the audit log and recordings open and close)."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "instructions.py"), "--child", "prepared", "30"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    helped = subprocess.run([sys.executable, str(ROOT / "bench" / "instructions.py"), "--help"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert helped.returncode == 0 and "callgrind" in helped.stdout


def test_proxy_python_runs_the_proxies_on_that_interpreter_and_the_full_one_on_both() -> None:
    """`--proxy-python`: every pgwarden target on the given interpreter (its own environment holds
    the build), and the fully loaded one also on the bench's own, in the same run."""
    run = load_runner()
    s = run.parse_args(["--full", "--compiled", "--parts", "--proxy-python", "/opt/py/bin/python3.11"])
    targets = {t.name: t for t in run.full_targets(s, {}, "/tmp/venv/bin/python", {"PYTHONPATH": "/build"})}
    assert list(targets)[:2] == ["pgwarden+full", "pgwarden+full-bench-python"]
    bench = targets.pop("pgwarden+full-bench-python")
    assert bench.python == sys.executable and bench.env == {"PYTHONPATH": "/build"}
    assert (bench.durability, bench.without) == ("write", ())  # the same configuration as pgwarden+full
    assert all(t.python == "/tmp/venv/bin/python" and "PYTHONPATH" not in t.env for t in targets.values())
    without = run.full_targets(run.parse_args(["--full"]), {"PYTHONPATH": "/build"})
    assert all(t.python == sys.executable for t in without)
    assert "pgwarden+full-bench-python" not in {t.name for t in without}


def test_the_results_say_how_each_interpreter_was_built() -> None:
    run = load_runner()
    me = run.interpreter(sys.executable)
    assert me["path"] == sys.executable and me["version"] == ".".join(map(str, sys.version_info[:3]))
    assert {type(me[k]) for k in ("shared_libpython", "configure_pgo", "configure_lto")} == {bool}
    # the tests' interpreter runs from a shared libpython exactly when its process maps one
    assert me["shared_libpython"] == ("libpython" in Path("/proc/self/maps").read_text())
    with pytest.raises(run.BenchError, match="not an executable interpreter"):
        with run.proxy_environment(Path("/nonexistent/python3"), compiled=False):
            pass


@pytest.mark.slow
def test_a_proxy_runs_from_the_environment_made_for_another_interpreter(tmp_path: Path) -> None:
    """The environment `--proxy-python` makes (requirements/proxy.lock, this checkout's wheel)
    starts a proxy that serves pgbench: the same path the fully loaded run takes, built pure here
    to keep the test short (the compiled build is the image's, tests/test_images_build.py)."""
    if shutil.which("pgbench") is None:
        pytest.skip("pgbench is not installed (apt-get install postgresql-contrib)")
    run = load_runner()
    with run.proxy_environment(Path(sys.executable), compiled=False) as py, run.postgres() as srv:
        assert Path(py).parent.parent != Path(sys.prefix)
        run.prepare_database(srv, 1)
        with run.pgwarden_proxy(srv, "pgwarden+full", run.full_documents(), "write", python=py) as target:
            assert target.build == "pure Python"
            s = run.parse_args(["--quick", "--duration", "1"])
            done = subprocess.run(run.pgbench_argv(target, "prepared", s, 1, None), capture_output=True, text=True,
                                  env=srv.env(target.user, target.password), timeout=60, check=False)
            assert done.returncode == 0, done.stderr[-2000:]
            assert "number of transactions actually processed" in done.stdout
