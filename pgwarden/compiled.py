"""The proxy's hot modules: compiled with mypyc when the package is built (setup.py), and the
`PGWARDEN_PURE_PYTHON=1` switch that runs their `.py` files instead.

A compiled build ships each module twice, `relay.py` beside `relay.cpython-311-….so`, and Python
imports the extension. With the switch set before pgwarden is imported, a finder placed ahead of
the normal ones loads the source files: the same behaviour, at pure-Python speed, to compare the
two builds (bench/run.py's `-pure` targets) or to rule the compiled code out when chasing a bug.
Only the standard library here: setup.py reads `HOT_MODULES` before anything is installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import TypeVar

T = TypeVar("T")

# Every message and every statement runs through these: framing, the relay, the session's gate,
# the audit log and the recorder. The list setup.py compiles; paths from the repository root.
HOT_MODULES = (
    "pgwarden/pgwire.py",
    "pgwarden/cache.py",
    "pgwarden/proxy/messages.py",
    "pgwarden/proxy/wire.py",
    "pgwarden/proxy/statements.py",
    "pgwarden/proxy/session.py",
    "pgwarden/proxy/relay.py",
    "pgwarden/proxy/gate.py",
    "pgwarden/audit/chain.py",
    "pgwarden/audit/records.py",
    "pgwarden/audit/log.py",
    "pgwarden/audit/filesink.py",
    "pgwarden/audit/recording.py",
)
PURE_ENV = "PGWARDEN_PURE_PYTHON"


def mypyc_attr(*args: object, **kwargs: object) -> Callable[[type[T]], type[T]]:
    """What `mypy_extensions.mypyc_attr` does at run time: nothing. mypyc needs that name to read a
    class's settings when it compiles; where mypy_extensions is not installed (the images), the
    hot modules import this one instead."""
    return lambda cls: cls


def module_names() -> list[str]:
    return [p.removesuffix(".py").replace("/", ".") for p in HOT_MODULES]


def is_compiled(module: ModuleType) -> bool:
    """True when `module` was loaded from an extension module (`….cpython-311-….so`)."""
    file = str(getattr(module, "__file__", None) or "")
    return file.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def check_compiled() -> None:
    """Exit with a message unless every hot module runs compiled (the proxy image's build step)."""
    import importlib

    pure = [n for n in module_names() if not is_compiled(importlib.import_module(n))]
    if pure:
        raise SystemExit(f"pgwarden: not compiled: {', '.join(pure)} (see setup.py; PGWARDEN_PURE_PYTHON="
                         f"{os.environ.get(PURE_ENV, '')!r})")


def build_of(module: ModuleType) -> str:
    """How `module` runs: 'compiled (mypyc)' for an extension module, else 'pure Python'."""
    return "compiled (mypyc)" if is_compiled(module) else "pure Python"


class _SourceFirst:
    """A meta path finder for the hot modules only: their `.py` file, never the extension."""

    names = frozenset(module_names())

    @classmethod
    def find_spec(cls, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in cls.names or not path:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for folder in path:
            source = Path(folder) / leaf
            if source.is_file():
                loader = importlib.machinery.SourceFileLoader(fullname, str(source))
                return importlib.util.spec_from_file_location(fullname, source, loader=loader)
        return None


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def install_switch() -> None:
    """Called by pgwarden/__init__.py: with PGWARDEN_PURE_PYTHON=1, hot modules load from source."""
    if pure_requested() and _SourceFirst not in sys.meta_path:
        sys.meta_path.insert(0, _SourceFirst)
