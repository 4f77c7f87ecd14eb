"""Where teachers come from: packaged names, pulled archives, local HF directories, hub ids.

Imports nothing of distill/ or service/. `distill_home` lives here, at the bottom of the package, so that
packaged.py (which installs under it) and registry.py (which re-exports it) both depend on it without a cycle.
"""

from __future__ import annotations

import os
from pathlib import Path


def distill_home() -> Path:
    """$DISTILL_HOME if set, else ~/.cache/distill. Read at call time so tests and settings can move it."""
    env = os.environ.get("DISTILL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distill"
