"""The core package needs no Ray (STYLE.md, habit 1): every module of ddpo/ imports with `ray`
unavailable, in a fresh interpreter so that no module is already imported."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import ddpo

ROOT = Path(__file__).resolve().parents[1]

IMPORT_ALL = """
import importlib, sys
sys.modules["ray"] = None  # `import ray` raises ImportError
for name in sys.argv[1:]:
    importlib.import_module(name)
"""


def test_every_core_module_imports_without_ray():
    names = [m.name for m in pkgutil.walk_packages(ddpo.__path__, "ddpo.")]
    assert "ddpo.config" in names and "ddpo.tiny.world" in names
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, *names], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
