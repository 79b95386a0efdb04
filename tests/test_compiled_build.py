"""The proxy's hot modules compiled with mypyc (setup.py), the pure-Python fallback, and the
`PGWARDEN_PURE_PYTHON=1` switch (pgwarden/compiled.py).

The suite runs against whichever build is installed: `.ci/run` runs it on the editable (pure)
install and the proxy families again on a compiled wheel, with PGWARDEN_EXPECT_BUILD saying which.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import sysconfig
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
    for name in ("pyproject.toml", "setup.py", "build_backend.py", "README.md"):
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


def build_wheel(source: Path, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`pip wheel` of `source` as a user or the image runs it, with `env` added (no build isolation:
    the test environment's setuptools and mypy)."""
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(out),
         str(source)],
        capture_output=True, text=True, timeout=1200, env={**os.environ, **env}, cwd=out,
    )


def extensions_in(wheel: Path) -> set[str]:
    """The extension modules a wheel holds, as module names."""
    return {n.split(".")[0].replace("/", ".") for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")}


def stale_extension(source: Path) -> Path:
    """A relay extension left in build/ by an earlier build, as a rebuilt checkout may hold."""
    lib = source / "build" / f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}" / "pgwarden" / "proxy"
    lib.mkdir(parents=True)
    stale = lib / f"relay{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    stale.write_bytes(b"not an extension")
    return stale


@pytest.mark.slow
def test_a_clean_checkout_builds_a_wheel_with_every_hot_module_compiled(tmp_path: Path) -> None:
    pytest.importorskip("mypyc")
    done = build_wheel(checkout_copy(tmp_path / "src"), tmp_path, PGWARDEN_COMPILE="require")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = tmp_path.glob("pgwarden-*.whl")
    # and the audit's steps in C (pgwarden/audit/_seal.c, pgwarden/audit/_recording.c)
    assert extensions_in(wheel) == {*compiled.module_names(), "pgwarden_hot__mypyc", *compiled.NATIVE_MODULES}
    assert {f"{p}" for p in compiled.HOT_MODULES} <= set(zipfile.ZipFile(wheel).namelist()), "the .py files ship too"
    # built for direct calls (setup.py, DIRECT_CALLS): the compiled functions are not exported, so
    # the compiler called and inlined them directly; the module's init function still is
    (group,) = [n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("pgwarden_hot__mypyc")]
    zipfile.ZipFile(wheel).extract(group, tmp_path / "unpacked")
    library = ctypes.CDLL(str(tmp_path / "unpacked" / group))
    assert hasattr(library, "PyInit_pgwarden_hot__mypyc")
    assert not hasattr(library, "CPyDef_relay___Relay____process_client")


@pytest.mark.slow
def test_without_a_c_compiler_the_wheel_is_pure_python_and_nothing_stale_ships(tmp_path: Path) -> None:
    """The fallback: no working compiler means a pure-Python wheel and a warning, not a failed
    install, and no extension an earlier build left in build/ rides along."""
    pytest.importorskip("mypyc")
    source = checkout_copy(tmp_path / "src")
    stale_extension(source)
    done = build_wheel(source, tmp_path, CC="/bin/false", LDSHARED="/bin/false")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "building pure Python" in done.stdout + done.stderr
    (wheel,) = tmp_path.glob("pgwarden-*.whl")
    assert "pgwarden/proxy/relay.py" in zipfile.ZipFile(wheel).namelist()
    assert extensions_in(wheel) == set()


@pytest.mark.slow
def test_a_required_compile_that_fails_fails_the_build(tmp_path: Path) -> None:
    """PGWARDEN_COMPILE=require (the proxy image, CI): no silent pure-Python image."""
    pytest.importorskip("mypyc")
    done = build_wheel(checkout_copy(tmp_path / "src"), tmp_path, PGWARDEN_COMPILE="require", CC="/bin/false",
                       LDSHARED="/bin/false")
    assert done.returncode != 0
    assert "PGWARDEN_COMPILE=require: not falling back to pure Python" in done.stdout + done.stderr
    assert not list(tmp_path.glob("pgwarden-*.whl"))


def test_an_opted_out_build_is_pure_python_even_over_a_stale_build(tmp_path: Path) -> None:
    source = checkout_copy(tmp_path / "src")
    stale_extension(source)
    done = build_wheel(source, tmp_path, PGWARDEN_COMPILE="0")
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("pgwarden-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    assert extensions_in(wheel) == set()
