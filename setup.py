"""Build hook: the proxy's per-statement modules compiled to C extensions with mypyc.

Everything else about the package is in pyproject.toml. The modules in `COMPILED` run for every
message and every statement the proxy relays; compiled, the fully loaded proxy spends less CPU per
statement (docs/benchmarks.md has the figures for both builds). The `.py` files ship beside the
extensions, and the package works without them:

- no C compiler, no mypyc, or a compile error: the wheel is built pure Python, with a warning;
- `PGWARDEN_COMPILE=0 pip install .`: pure Python on purpose;
- an editable install (`pip install -e .`) is never compiled, so an edited `.py` file is what runs;
- `PGWARDEN_PURE_PYTHON=1` at run time: an installed compiled build runs its `.py` files instead
  (pgwarden/compiled.py), to compare the two or to rule the compiled code out.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The per-message and per-statement path, listed in pgwarden/compiled.py (read, not imported:
# nothing is installed yet)
COMPILED = list(runpy.run_path(str(Path(__file__).parent / "pgwarden" / "compiled.py"))["HOT_MODULES"])


def _warn(message: str) -> None:
    print(f"pgwarden: {message}; installing pure Python (slower proxy, same behaviour)", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Translates and compiles the hot modules when a wheel is built, and only then (the metadata
    steps and editable installs never run mypyc); any failure leaves the pure-Python package."""

    def run(self) -> None:
        if not self.extensions:
            return  # PGWARDEN_COMPILE=0
        if getattr(self, "editable_mode", False) or self.inplace:
            self.extensions = []  # an editable install runs the source files, never a stale extension
            return
        self.extensions = _mypycify()
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any compiler failure means the pure-Python fallback
            _warn(f"could not compile the proxy's hot modules ({e})")
            self.extensions = []

    def get_outputs(self) -> list[str]:
        return super().get_outputs() if self.extensions else []


def _mypycify() -> list[Any]:
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not installed")
        return []
    try:
        # the package's mypy settings apply; only the unused-section note would end the build
        return list(mypycify(["--no-warn-unused-configs", *COMPILED], opt_level="3", group_name="pgwarden_hot"))
    except (Exception, SystemExit) as e:  # noqa: BLE001 - mypyc refuses a module (it exits): fall back
        _warn(f"mypyc could not translate the proxy's hot modules ({e})")
        return []


# A stand-in until build_ext runs: it makes the wheel platform-specific; build_ext replaces it with
# mypyc's extensions (or none)
PLACEHOLDER = [Extension("pgwarden_hot__mypyc", sources=[])]
setup(ext_modules=[] if os.environ.get("PGWARDEN_COMPILE", "1") == "0" else PLACEHOLDER,
      cmdclass={"build_ext": OptionalBuildExt})
