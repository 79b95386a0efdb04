"""The repository layout: the design's top-level folders, without shadowing the standard library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_root_on_the_path_does_not_shadow_the_standard_librarys_operator() -> None:
    """`operator/` holds the Kubernetes operator, but `import operator` must stay the standard
    library's wherever a tool puts the repository root on sys.path (PYTHONPATH=., a script there)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import operator, pgwarden.operator.injection as inj; "
            "print(operator.__file__); print(operator.eq(1, 1)); print(inj.__name__)")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    stdlib, same, name = res.stdout.split()
    assert not stdlib.startswith(str(ROOT)) and same == "True" and name == "pgwarden.operator.injection"


def test_the_design_folders_are_the_packages_under_their_import_names() -> None:
    import importlib

    for folder, package in (("proxy", "pgwarden.proxy"), ("operator", "pgwarden.operator")):
        assert (ROOT / folder).is_dir()
        assert Path(next(iter(importlib.import_module(package).__path__))).resolve() == (ROOT / folder).resolve()
        link = ROOT / "pgwarden" / folder
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), f"{link} must point at {folder}/"
    assert not (ROOT / "operator" / "__init__.py").exists(), "operator/ must not be a regular package"
