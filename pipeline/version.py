"""The code version recorded in every manifest: the package version plus the git commit when there is one."""

from __future__ import annotations

import subprocess
from functools import cache

from pipeline import __version__
from pipeline.config import ROOT


@cache
def code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{out}" if out else __version__
