"""The build backend: setuptools', plus mypy (for mypyc), orjson and pglast (for their types) only
when a wheel may be compiled.

setup.py compiles the proxy's hot modules when a wheel is built. An editable install, an sdist
and `PGWARDEN_COMPILE=0` never compile, so they do not fetch mypy; a wheel build does.
"""

from __future__ import annotations

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - every other hook is setuptools' own

MYPYC = "mypy>=1.10"  # mypyc ships with mypy; the same lower bound as the dev extra
# the third-party packages whose types the compiled modules' own code uses (orjson's dumps returns
# bytes, pglast's parser): present, the translation types their values as the developer's check does;
# absent, they would be Any and every use a generic call. The bounds are pyproject.toml's.
TYPED_BY = ("orjson>=3.8", "pglast>=7.0")


def get_requires_for_build_wheel(config_settings: dict[str, object] | None = None) -> list[str]:
    compile_ = os.environ.get("PGWARDEN_COMPILE", "auto").strip().lower() != "0"
    return [*_setuptools.get_requires_for_build_wheel(config_settings), *((MYPYC, *TYPED_BY) if compile_ else ())]
