"""The build backend: setuptools', plus mypy (for mypyc) only when a wheel may be compiled.

setup.py compiles the proxy's hot modules when a wheel is built. An editable install, an sdist
and `PGWARDEN_COMPILE=0` never compile, so they do not fetch mypy; a wheel build does.
"""

from __future__ import annotations

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - every other hook is setuptools' own

MYPYC = "mypy>=1.10"  # mypyc ships with mypy; the same lower bound as the dev extra


def get_requires_for_build_wheel(config_settings: dict[str, object] | None = None) -> list[str]:
    compile_ = os.environ.get("PGWARDEN_COMPILE", "auto").strip().lower() != "0"
    return [*_setuptools.get_requires_for_build_wheel(config_settings), *([MYPYC] if compile_ else [])]
