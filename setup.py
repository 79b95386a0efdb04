"""Build hook: the proxy's per-statement modules compiled to C extensions with mypyc, and the
audit's steps in C (pgwarden/audit/_seal.c, the chain's sealing step and a statement's records;
pgwarden/audit/_recording.c, a session recording's lines).

Everything else about the package is in pyproject.toml. The modules in `COMPILED` run for every
message and every statement the proxy relays; compiled, they cost 9-12 % less CPU in-process
(docs/benchmarks.md has the figures for both builds). The `.py` files ship beside the extensions,
and the package works without them. `PGWARDEN_COMPILE` decides:

- unset or `auto`: compiled when mypyc and a C compiler work; otherwise pure Python, with a
  warning (shown by `pip -v`);
- `require`: compiled, or the build fails (the proxy image, CI, `bench/run.py --compiled`);
- `0`: pure Python on purpose (the operator image); mypy is then not even fetched (build_backend.py).

An editable install (`pip install -e .`) is never compiled, so an edited `.py` file is what runs.
`PGWARDEN_PURE_PYTHON=1` at run time makes a compiled install run its `.py` files
(pgwarden/compiled.py), to compare the two builds or to rule the compiled code out.
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
# The per-message and per-statement path, listed in pgwarden/compiled.py (read, not imported:
# nothing is installed yet)
COMPILED = list(runpy.run_path(str(HERE / "pgwarden" / "compiled.py"))["HOT_MODULES"])
BUILD_COMMANDS = {"bdist_wheel", "build", "build_ext", "install"}  # not egg_info, dist_info, sdist, editable_wheel
GROUP = "pgwarden_hot"  # mypyc's shared library: pgwarden_hot__mypyc.<abi>.so
MODE = os.environ.get("PGWARDEN_COMPILE", "auto").strip().lower() or "auto"
if MODE not in ("auto", "require", "0"):
    sys.exit(f"PGWARDEN_COMPILE={MODE!r}: use auto (the default), require or 0")


# mypy's settings for the translation, over the package's strict ones (pyproject.toml). A build
# environment holds only what the build asks for (build_backend.py: mypy, and orjson and pglast,
# whose types the compiled modules' own code uses); the image's builder stage has nothing else. So
# a third-party package missing here is Any (called as Python calls it, the same behaviour), errors
# are reported only in the compiled modules themselves, and what depends on a package being there
# (an ignore comment, a value typed Any) is no error. The strict check of the whole package, with
# everything installed, is `mypy` in .ci/run. Without these the wheel built only where the
# developer's packages happened to be installed (the unused-section note would end the build too).
TRANSLATION_OPTIONS = ("--no-warn-unused-configs", "--ignore-missing-imports", "--follow-imports=silent",
                       "--no-warn-unused-ignores", "--no-warn-return-any", "--allow-subclassing-any")

# Compiler flags for the extensions, each used where the compiler takes it (probed; a compiler that
# does not builds without it). The compiled modules' functions call one another and mypyc's runtime
# helpers, all in one shared object, thousands of times per statement. Exported from a shared
# object, every such call went through the PLT and none could be inlined: another library might
# interpose the function. Nothing does (the modules reach each other through capsules; only their
# PyInit_* functions are looked up by name, and PyMODINIT_FUNC keeps those exported), so the
# compiler may call and inline them directly and keep them out of the dynamic symbol table.
# CPython builds its own library with -fno-semantic-interposition for the same reason.
DIRECT_CALLS = ("-fno-semantic-interposition", "-fvisibility=hidden")


class CompileError(RuntimeError):
    """PGWARDEN_COMPILE=require and the hot modules could not be compiled."""


def _fallback(message: str) -> None:
    if MODE == "require":
        raise CompileError(f"{message} (PGWARDEN_COMPILE=require: not falling back to pure Python)")
    print(f"pgwarden: {message}; building pure Python (slower proxy, same behaviour)", file=sys.stderr)


def _mypycify() -> list[Any]:
    try:
        from mypyc.build import mypycify
    except ImportError:
        _fallback("mypyc is not installed")
        return []
    try:
        # the package's mypy settings, eased where the build environment differs (TRANSLATION_OPTIONS)
        return list(mypycify([*TRANSLATION_OPTIONS, *COMPILED], opt_level="3", group_name=GROUP))
    except (Exception, SystemExit) as e:  # noqa: BLE001 - mypyc refuses a module (it exits): fall back
        _fallback(f"mypyc could not translate the proxy's hot modules ({e})")
        return []


class OptionalBuildExt(build_ext):
    """Translates and compiles the hot modules when a wheel is built, and only then (the metadata
    steps and editable installs never run mypyc). A wheel holds all of them or none: a failure
    removes what was built, so no stale or partial extension can shadow a `.py` file."""

    def finalize_options(self) -> None:
        # mypyc's extensions replace the stand-in before setuptools prepares each extension (its
        # names, stubs and file names are set here). The metadata steps finalize this command too
        # (egg_info lists the extensions' sources): mypyc runs only for a build.
        if self.distribution.ext_modules == PLACEHOLDER:
            editable = getattr(self, "editable_mode", False) or self.inplace
            building = bool(BUILD_COMMANDS & set(self.distribution.commands)) and not editable
            compiled = _mypycify() if building else []
            # all or none: the audit's C steps only beside the mypyc modules
            self.distribution.ext_modules = [*compiled, *NATIVE] if compiled else []
        super().finalize_options()

    def run(self) -> None:
        self._remove_built()  # whatever an earlier build left in build/lib*
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any compiler failure means the pure-Python fallback
            self._remove_built()
            self.extensions = []
            _fallback(f"could not compile the proxy's hot modules ({e})")

    def build_extensions(self) -> None:
        flags = [flag for flag in DIRECT_CALLS if self._takes(flag)]
        for ext in self.extensions:
            ext.extra_compile_args = [*(ext.extra_compile_args or []), *flags]
        super().build_extensions()

    def _takes(self, flag: str) -> bool:
        """Whether the C compiler builds with `flag` (-Werror: clang only warns of one it does not know)."""
        if self.compiler.compiler_type != "unix":
            return False
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / "probe.c"
            probe.write_text("int probe(void) { return 0; }\n")
            try:
                self.compiler.compile([str(probe)], output_dir=tmp, extra_postargs=[flag, "-Werror"])
            except Exception:  # noqa: BLE001 - any failure: build without the flag
                return False
        return True

    def get_outputs(self) -> list[str]:
        return super().get_outputs() if self.extensions else []

    def _remove_built(self) -> None:
        lib = Path(self.build_lib)
        stems = [GROUP + "__mypyc", *(ext.sources[0].removesuffix(".c") for ext in NATIVE)] + \
            [p.removesuffix(".py") for p in COMPILED]
        for stem in stems:
            folder, name = (lib / stem).parent, (lib / stem).name
            if folder.is_dir():
                for built in folder.glob(name + ".*.so"):
                    built.unlink()


# The audit's steps in C, built and left out with the mypyc modules (the package runs without
# them): the chain's sealing step (canonical JSON and SHA-256 in one call) with a statement's
# decision and outcome records (_records.h), and a session recording's lines; both write JSON
# with pgwarden/audit/_json.h
JSON_WRITER = "pgwarden/audit/_json.h"
NATIVE = [
    Extension("pgwarden.audit._seal", sources=["pgwarden/audit/_seal.c"],
              depends=[JSON_WRITER, "pgwarden/audit/_records.h"],
              extra_compile_args=["-O2"], libraries=["dl"] if sys.platform.startswith("linux") else []),
    Extension("pgwarden.audit._recording", sources=["pgwarden/audit/_recording.c"], depends=[JSON_WRITER],
              extra_compile_args=["-O2"]),
]

# A stand-in until build_ext is finalized: it makes the wheel platform-specific; build_ext puts
# mypyc's extensions (or none) in its place
PLACEHOLDER = [Extension(GROUP + "__mypyc", sources=[])]
setup(ext_modules=[] if MODE == "0" else PLACEHOLDER, cmdclass={"build_ext": OptionalBuildExt})
