"""Smoke tests of the bench/ scripts, each run at a small size on the CPU."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from pipeline.config import ROOT


def load_bench(name: str) -> ModuleType:
    """bench/NAME.py as a module named bench_NAME (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module
