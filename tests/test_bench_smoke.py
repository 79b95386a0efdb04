"""bench/run.py --quick end to end: direct, PgBouncer and pgwarden all serve pgbench -S.

Why a smoke test: the benchmark is run by hand, rarely, so it rots silently (a changed CLI flag,
a config key the proxy now rejects, pgbench output that no longer parses). This keeps it
runnable; it says nothing about speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
