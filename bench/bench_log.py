"""The benches' event sink: one timestamped line per pipeline event, training steps thinned to every 50th."""

from __future__ import annotations

import time
from typing import Any


def log_event(kind: str, data: dict[str, Any]) -> None:
    if kind == "progress" and "loss" in data and data["step"] % 50:  # the teacher-output pieces all show
        return
    print(f"  [{time.strftime('%H:%M:%S')}] {kind} {data}", flush=True)
