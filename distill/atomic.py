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
    restore_replaced(target)
    shutil.rmtree(staged, ignore_errors=True)
    try:
        yield staged
        replace_dir(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def check_replaceable(target: Path, marker: str, source: Path | None = None) -> None:
    """ValueError unless a command may replace directory `target` whole with its output: absent, empty, or holding
    `marker` (an earlier output of the command), and neither `source` nor a folder above it."""
    target = target.resolve()
    if source is not None and (target == source.resolve() or target in source.resolve().parents):
        raise ValueError(f"{target} holds the input {source}, and the output directory is replaced whole; give "
                         f"another one")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; give a directory to write to")
    if target.is_dir() and not (target / marker).exists() and any(target.iterdir()):
        raise ValueError(f"{target} is not empty and holds no earlier output ({marker}); the output directory is "
                         f"replaced whole, so give a new or empty one")


def replace_dir(staged: Path, target: Path) -> None:
    """Swap a fully built directory in for `target` (whatever was there is removed afterwards). Two renames: the old
    one steps aside first, and a crash between them leaves it beside `target`, put back by the next swap."""
    old = target.with_name(target.name + REPLACED)
    restore_replaced(target)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def restore_replaced(target: Path) -> None:
    """Put back the directory a crash between replace_dir's renames left aside: the swap never happened. Done by
    the next swap, and by whoever reads `target` after a crash without swapping first (a resumed run's best/)."""
    old = target.with_name(target.name + REPLACED)
    if old.is_dir() and not target.exists():
        os.replace(old, target)


@contextmanager
def _staged_file(path: Path) -> Iterator[Path]:
    """The place to write `path`'s new content: renamed over `path` when the block ends, removed when it raises (a
    checkpoint cut short by a full disk would otherwise stay beside it, as large as the model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(path.name + STAGED)
    try:
        yield staged
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with _staged_file(path) as staged:
        staged.write_text(text, encoding="utf-8")


def save_torch(obj: object, path: Path) -> None:
    """torch.save to `path` through a staged file: a crash mid-write never leaves a truncated checkpoint or cache."""
    import torch  # here, not at the top: the service imports this module without needing torch

    with _staged_file(path) as staged:
        torch.save(obj, staged)
