"""The proxy's hot modules compiled with mypyc (setup.py), the pure-Python fallback, and the
`PGWARDEN_PURE_PYTHON=1` switch (pgwarden/compiled.py).

The suite runs against whichever build is installed: `.ci/run` runs it on the editable (pure)
install and the proxy families again on a compiled wheel, with PGWARDEN_EXPECT_BUILD saying which.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pgwarden import compiled

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import json, importlib; from pgwarden import compiled; "
    "print(json.dumps({n: importlib.import_module(n).__file__ for n in compiled.module_names()}))"
)


def checkout_copy(dest: Path) -> Path:
    """What the images' build context holds (.dockerignore), copied: a build of its own, without
    the checkout's build/ folder."""
    dest.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("pgwarden", "proxy", "operator"):
        shutil.copytree(ROOT / name, dest / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    return dest


def loaded_files(**env: str) -> dict[str, str]:
    """Where each hot module is loaded from, in a fresh interpreter with `env` added."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, cwd="/")
    assert done.returncode == 0, done.stderr
    files: dict[str, str] = json.loads(done.stdout)
    return files


def test_the_listed_modules_are_the_source_files_of_the_package() -> None:
    for path, name in zip(compiled.HOT_MODULES, compiled.module_names(), strict=True):
        assert (ROOT / path).is_file(), path
        module = importlib.import_module(name)
        assert Path(str(module.__file__)).name.split(".")[0] == Path(path).stem


def test_the_installed_build_is_all_compiled_or_all_pure() -> None:
    """A half-compiled install would mix two builds of one session's code; CI says which it built."""
    builds = {compiled.build_of(importlib.import_module(n)) for n in compiled.module_names()}
    assert len(builds) == 1, builds
    expected = os.environ.get("PGWARDEN_EXPECT_BUILD")
    if expected:
        assert builds == {"compiled (mypyc)" if expected == "compiled" else "pure Python"}


def test_the_pure_python_switch_loads_every_hot_module_from_its_source() -> None:
    files = loaded_files(PGWARDEN_PURE_PYTHON="1")
    assert sorted(files) == sorted(compiled.module_names())
    assert all(f.endswith(".py") for f in files.values()), files
    # and without the switch the install's own build runs (the extension, when compiled)
    plain = loaded_files(PGWARDEN_PURE_PYTHON="0")
    want = os.environ.get("PGWARDEN_EXPECT_BUILD")
    if want == "compiled":
        assert not any(f.endswith(".py") for f in plain.values()), plain


def test_the_proxy_says_which_build_it_runs(make_proxy, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level("INFO", logger="pgwarden.proxy"):
        make_proxy()
    started = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
    from pgwarden.proxy import relay

    assert started and started[-1].endswith(f"(hot path: {compiled.build_of(relay)})"), started


@pytest.mark.slow
def test_a_wheel_built_without_a_c_compiler_is_pure_python_and_says_so(tmp_path: Path) -> None:
    """The fallback: no working compiler means a pure-Python wheel and a warning, not a failed install."""
    pytest.importorskip("mypyc")
    env = {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"}
    source = checkout_copy(tmp_path / "src")  # no build/ left by an earlier build: the compiler must run
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp_path),
         str(source)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "installing pure Python" in done.stdout + done.stderr
    (wheel,) = tmp_path.glob("pgwarden-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pgwarden/proxy/relay.py" in names
    assert not [n for n in names if n.endswith(".so")], names


def test_an_opted_out_build_is_pure_python(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(checkout_copy(tmp_path / "src"))],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PGWARDEN_COMPILE": "0"}, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("pgwarden-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")]
