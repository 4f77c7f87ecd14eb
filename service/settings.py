"""Service settings from the environment (prefix DISTILL_); built in create_app or a cached getter, not at import."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from distill.config import Device
from distill.distributed import uses_cuda
from teachers.registry import distill_home


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="ignore")

    home: Path = Field(default_factory=distill_home, description="Jobs, datasets, the SQLite store, caches.")
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = Field("INFO", description="Level of the JSON log lines on stderr.")
    api_key: str | None = Field(None, description="When set, every /v1 route, /readyz and /metrics need "
                                                  "'Authorization: Bearer'.")
    # Jobs
    max_concurrent_jobs: int = Field(1, ge=1, description="Jobs training at once (each is one subprocess).")
    max_queued_jobs: int = Field(16, ge=0, description="Jobs waiting beyond the running ones; past it: 429.")
    max_pending_comparisons: int = Field(8, ge=1, description="Comparisons queued or running at once; past it: 429.")
    max_job_processes: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1,
                                   description="Most training processes one job may ask for "
                                               "(distributed.nproc_per_node; default: the CPU count); past it: 422.")
    multi_node_jobs: bool = Field(False, description="Accept jobs with distributed.nnodes > 1: their torchrun "
                                                     "joins the rendezvous host the client names.")
    cancel_grace_seconds: float = Field(10.0, ge=0, description="After SIGTERM, how long a job process has before "
                                                                "SIGKILL (cancel, shutdown).")
    progress_event_seconds: float = Field(0.5, ge=0, description="A job's progress events are stored at most this "
                                          "often, besides each stage's first and last (a GPU takes tens of steps "
                                          "a second; 0 stores every step).")
    model_dirs: list[Path] = Field(default_factory=list, description="Server directories, besides "
                                   "$DISTILL_HOME/teachers, under which a job's teacher.name / student.model may "
                                   "name a model directory (JSON list); other local paths are refused, as data "
                                   "paths are.")
    # Datasets
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1)
    # Inference
    max_batch_texts: int = Field(64, ge=1, description="Texts per /predict, /embed, /score or /compare request; "
                                                       "past it: 413.")
    max_concurrent_generations: int = Field(2, ge=1, description="/generate calls run at once; more wait their "
                                                                 "turn (a generation holds a thread per token).")
    max_text_chars: int = Field(5000, ge=1, description="Characters per text; past it: 422.")
    model_cache_bytes: int = Field(4 * 1024**3, ge=1, description="Memory cap of the loaded-model LRU cache.")
    batch_max_size: int = Field(32, ge=1, description="Micro-batching: most texts merged into one model call.")
    batch_max_wait_ms: float = Field(5.0, ge=0, description="Micro-batching: longest wait for more requests.")
    inference_threads: int | None = Field(None, ge=1, description="Intra-op threads per model (default: PyTorch's, "
                                                                   "OMP_NUM_THREADS or the physical cores).")
    inference_spinning: bool = Field(True, description="ONNX Runtime's threads spin-wait for the next call after "
                                                       "each one (its default): lower latency for sequential "
                                                       "requests; false saves CPU per request on a busy server "
                                                       "(bench/serve.py measures both).")
    inference_device: Device = Field("auto", description="Where the PyTorch models (a job's .teacher and "
                                                         ".student-torch) answer: auto takes the GPU when torch "
                                                         "sees one, as jobs do; the ONNX models run on the CPU.")

    @field_validator("home", "model_dirs")
    @classmethod
    def _absolute(cls, value: Path | list[Path]) -> Path | list[Path]:
        # Job processes run in their own directories: a relative path would name another place there.
        return [p.expanduser().resolve() for p in value] if isinstance(value, list) else value.expanduser().resolve()

    @field_validator("inference_device")
    @classmethod
    def _gpu_present(cls, value: Device) -> Device:
        if value == "cuda" and not torch.cuda.is_available():
            raise ValueError("'cuda', but torch sees no GPU on this machine (torch.cuda.is_available() is False); "
                             "allowed: 'auto' (the GPU when there is one) or 'cpu'")
        return value

    @property
    def torch_device(self) -> torch.device:
        """The device inference_device names on this machine."""
        return torch.device("cuda", torch.cuda.current_device()) if uses_cuda(self.inference_device) \
            else torch.device("cpu")

    @property
    def model_roots(self) -> list[Path]:
        """Where jobs may name model directories: the server's own teachers (pulled ones, a trained causal LM)."""
        return [self.home / "teachers", *self.model_dirs]

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "uploads"

    @property
    def database(self) -> Path:
        return self.home / "service.sqlite3"


@lru_cache
def get_settings() -> Settings:
    return Settings()
