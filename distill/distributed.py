"""Data-parallel runs: the torchrun command line, the process group, and rank helpers.

A job with `distributed.nproc_per_node > 1` (or several nodes) is re-executed under torchrun
(`python -m torch.distributed.run`); each worker joins the process group from the environment torchrun sets and the
engine wraps the student in DistributedDataParallel. Without torchrun nothing here initializes anything, and the
helpers answer as for a single process (rank 0 of 1), so the common path has no DDP in it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from distill.config import ConfigError, Device, DistributedConfig

T = TypeVar("T")

# Ranks wait for rank 0 while it prepares the teacher and computes its outputs (minutes to tens of minutes for a
# 100M-parameter teacher on CPU); torchrun stops the whole group when a worker dies, so this only bounds a hang.
WAIT = datetime.timedelta(hours=6)


def wanted(cfg: DistributedConfig) -> bool:
    """Whether the job asks for more than one process (so it has to be launched through torchrun)."""
    return cfg.nproc_per_node * cfg.nnodes > 1


def launched() -> bool:
    """Whether this process is a torchrun worker (torchrun sets LOCAL_RANK, RANK, WORLD_SIZE, MASTER_ADDR...)."""
    return "LOCAL_RANK" in os.environ


def torchrun_command(cfg: DistributedConfig, run_id: str, module: str, *args: str) -> list[str]:
    """The command that runs `python -m module args...` as cfg.nproc_per_node workers per node (torchrun_args)."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(cfg, run_id, module, *args)]


def torchrun_args(cfg: DistributedConfig, run_id: str, module: str, *args: str) -> list[str]:
    """torchrun's arguments for `python -m module args...` as cfg.nproc_per_node workers per node.

    One node: `--standalone` (a private rendezvous on a free port). Several: the c10d rendezvous at
    cfg.rdzv_endpoint, with `run_id` naming the job (every node must run the same command).
    """
    if cfg.nnodes == 1:
        where = ["--standalone"]
    else:
        where = [f"--nnodes={cfg.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}",
                 f"--rdzv-id={run_id}"]
    return [*where, f"--nproc-per-node={cfg.nproc_per_node}", "-m", module, *args]


def uses_cuda(choice: Device) -> bool:
    """Whether a job with `device: choice` computes on a GPU here; 'cuda' without one is a ConfigError."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda', but torch sees no GPU on this machine (torch.cuda.is_available() is "
                          "False); allowed: 'auto' (the GPU when there is one) or 'cpu'")
    return choice != "cpu" and torch.cuda.is_available()


@contextlib.contextmanager
def process_group(choice: Device) -> Iterator[None]:
    """Join the process group when running under torchrun (nccl on GPUs, one per local rank, when the machine has
    one for each; else gloo on the CPU); a no-op otherwise."""
    if not launched() or dist.is_initialized():
        yield
        return
    local, gpus = int(os.environ["LOCAL_WORLD_SIZE"]), torch.cuda.device_count()
    if choice == "cuda" and local > gpus:
        raise ConfigError(f"device: 'cuda' with distributed.nproc_per_node {local} needs a GPU per process, and torch "
                          f"sees {gpus}; lower nproc_per_node or use device 'auto' or 'cpu'")
    cuda = uses_cuda(choice) and local <= gpus
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def active() -> bool:
    """More than one process trains together (the engine wraps the model in DDP)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and emits events."""
    return rank() == 0


_placed = torch.device("cpu")  # see place()


def place(choice: Device) -> torch.device:
    """Choose where this job computes (each task's run does, first thing); device() answers it from then on.

    A torchrun worker: its own GPU under nccl, else the CPU. A single process: the current GPU when `choice` allows
    one and torch sees one, else the CPU. One job per process (the CLI, the service's job subprocesses), so one
    choice per process."""
    global _placed
    cuda = dist.get_backend() == "nccl" if dist.is_initialized() else uses_cuda(choice)
    _placed = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return _placed


def device() -> torch.device:
    """Where this process computes: what place() chose, the CPU before any job chose."""
    return _placed


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: T | None) -> T:
    """Rank 0's `obj` on every rank (pickled; other ranks pass None)."""
    if not active():
        assert obj is not None
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


_standing_in = False  # see standing_in


@contextlib.contextmanager
def standing_in(standing: bool = True) -> Iterator[None]:
    """While this rank computes a stand-in example (the engine's: DDP needs every rank in every backward, and a last
    batch smaller than the world leaves some rank none), gather_rows leaves its rows out of the gathered batch, so
    no rank's in-batch loss reads an example twice."""
    global _standing_in
    previous, _standing_in = _standing_in, standing
    try:
        yield
    finally:
        _standing_in = previous


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (N_r, ...) concatenated in rank order, on every rank; gradients flow back to each rank's
    own rows (summed over the ranks whose losses read them). The rows themselves in one process; none of a rank
    that is `standing_in`."""
    if not active():
        return rows
    own = rows[:0] if _standing_in else rows
    return _GatherRows.apply(own, gather(len(own)))


class _GatherRows(torch.autograd.Function):
    """all_gather of row blocks whose sizes may differ by rank; backward all-reduces (gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes = sizes
        padded = torch.cat([rows, rows.new_zeros((max(sizes) - len(rows), *rows.shape[1:]))]).contiguous()
        blocks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(blocks, padded)
        return torch.cat([block[:size] for block, size in zip(blocks, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total)  # every rank's loss read every rank's rows
        start = sum(ctx.sizes[:rank()])
        return total[start:start + ctx.sizes[rank()]], None


def sum_across(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over ranks (a copy; the input is left alone)."""
    total = value.detach().clone()
    if active():
        dist.all_reduce(total)
    return total
