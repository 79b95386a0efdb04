"""The audit's C extensions for the tests: the installed build's, or compiled here from source
with the machine's C compiler (an editable install has none), so both CI stages check the C code."""

from __future__ import annotations

import importlib
import importlib.util
import sysconfig
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
AUDIT = ROOT / "pgwarden" / "audit"


def compile_extension(name: str, folder: Path) -> ModuleType:
    """pgwarden/audit/`name`.c built with setuptools into `folder`, and imported."""
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    source = AUDIT / f"{name}.c"
    dist = Distribution({"ext_modules": [Extension(name, [str(source)], libraries=["dl"],
                                                   depends=[str(AUDIT / "_json.h"), str(AUDIT / "_records.h")])]})
    cmd = build_ext(dist)
    cmd.build_lib = str(folder)
    cmd.build_temp = str(folder / "tmp")
    cmd.ensure_finalized()
    cmd.run()
    built = next(folder.glob(name + "*" + sysconfig.get_config_var("EXT_SUFFIX")))
    spec = importlib.util.spec_from_file_location(name, built)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def native_extension(name: str, folder: Path) -> ModuleType:
    """pgwarden.audit.`name` as installed, else compiled from its source into `folder`."""
    try:
        return importlib.import_module(f"pgwarden.audit.{name}")
    except ImportError:
        return compile_extension(name, folder)
