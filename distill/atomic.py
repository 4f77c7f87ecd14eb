"""Write, then rename: a reader (or a crash) never finds a half-written artifact under its final name."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGED, REPLACED = ".tmp", ".old"  # suffixes of what is being written, and of what it replaces until it is in


@contextmanager
def building(target: Path) -> Iterator[Path]:
    """Build directory `target` in the yielded empty place beside it (same filesystem, so the swap is a rename):
    swapped in whole when the block ends, removed when the block raises (`target` then stays as it was)."""
    staged = target.with_name(target.name + STAGED)
    shutil.rmtree(staged, ignore_errors=True)
    try:
        yield staged
        replace_dir(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def replace_dir(staged: Path, target: Path) -> None:
    """Swap a fully built directory in for `target` (whatever was there is removed afterwards)."""
    old = target.with_name(target.name + REPLACED)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(path.name + STAGED)
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, path)


def save_torch(obj: object, path: Path) -> None:
    """torch.save to `path` through a staged file: a crash mid-write never leaves a truncated checkpoint or cache."""
    import torch  # here, not at the top: the service imports this module without needing torch

    staged = path.with_name(path.name + STAGED)
    torch.save(obj, staged)
    os.replace(staged, path)
