"""The benches' event sink: one timestamped line per pipeline event, training steps thinned to every 50th."""

from __future__ import annotations

import time
from typing import Any


def log_event(kind: str, data: dict[str, Any]) -> None:
    if kind == "progress" and not _shown(data):
        return
    print(f"  [{time.strftime('%H:%M:%S')}] {kind} {data}", flush=True)


def _shown(progress: dict[str, Any]) -> bool:
    if "loss" in progress:  # a training step
        return progress["step"] % 50 == 0
    # examples: every teacher-output piece shows, the head's feature pass (a batch each) once it is done
    return progress["stage"] != "teacher-head" or progress["step"] == progress["total_steps"]
