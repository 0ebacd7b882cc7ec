"""Process-group setup. The trainer receives a DistEnv; how it was discovered is launch/'s job."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator at import; without CUDA it must be told to use the CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(env: DistEnv, backend: str, timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed (through DeepSpeed) for `env` if it is not already up."""
    if dist.is_initialized():
        return
    os.environ["RANK"] = str(env.rank)
    os.environ["LOCAL_RANK"] = str(env.local_rank)
    os.environ["WORLD_SIZE"] = str(env.world_size)
    os.environ["MASTER_ADDR"] = env.master_addr
    os.environ["MASTER_PORT"] = str(env.master_port)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.world_size == 1:
        # One process needs no rendezvous: an in-memory store avoids racing for a TCP port.
        store: dist.Store = dist.HashStore()
    else:
        # Under torchrun the store outlives a restart; DeepSpeed's extra process groups would
        # read the dead attempt's addresses from it, so each attempt gets its own key space.
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"scaletrain/attempt_{attempt}", store)
    dist.init_process_group(
        backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout
    )
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=timeout,
        rank=env.rank,
        world_size=env.world_size,
    )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks (identity on one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """The largest of a few floats over all ranks (identity on one rank)."""
    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [float(v) for v in tensor.tolist()]


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def set_collective_timeout(timeout_s: float) -> None:
    """Shorten the timeout of collectives once setup is over, so a stalled rank fails the job."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(datetime.timedelta(seconds=timeout_s))
