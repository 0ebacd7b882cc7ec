"""Turn any launcher's environment into one DistEnv (rank, local rank, world size, master).

Supported, in order of precedence:
- torchrun / `accelerate launch` / the DeepSpeed launcher: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT;
- mpirun / mpiexec (OpenMPI, MPICH, Intel MPI): rank, size, node-local rank and the master
  address are discovered through mpi4py (rank 0 broadcasts its address and a free port);
- srun without torchrun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, head node from
  `scontrol show hostnames`;
- otherwise a single process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Mapping

from trainer.distributed import DistEnv, free_port

DEFAULT_PORT = 29500
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


class LaunchError(ValueError):
    """The launcher environment is incomplete or inconsistent; the message says what is missing."""


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise LaunchError(f"{key}={environ[key]!r} is not an integer") from None


def _checked(env: DistEnv, source: str) -> DistEnv:
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise LaunchError(f"{source}: rank {env.rank} is outside world size {env.world_size}")
    return env


def from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in environ]
    if missing:
        raise LaunchError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} missing")
    env = DistEnv(
        rank=_int(environ, "RANK"),
        local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
        world_size=_int(environ, "WORLD_SIZE"),
        master_addr=environ["MASTER_ADDR"],
        master_port=_int(environ, "MASTER_PORT"),
    )
    return _checked(env, "torchrun environment")


def from_mpi(environ: Mapping[str, str]) -> DistEnv:
    """Rank and master through mpi4py; every rank must call this (it is collective)."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:
        raise LaunchError(
            "launched by mpirun but mpi4py cannot load an MPI library "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
            "install one, e.g. `pip install mpich` or your cluster's MPI module"
        ) from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_rank()
    master = None
    if rank == 0:
        addr = environ.get("MASTER_ADDR") or _host_address()
        port = int(environ.get("MASTER_PORT") or free_port())
        master = (addr, port)
    addr, port = comm.bcast(master, root=0)
    return _checked(DistEnv(rank, local_rank, size, addr, port), "MPI environment")


def _host_address() -> str:
    hostname = socket.gethostname()
    try:
        return socket.gethostbyname(hostname)
    except OSError:
        return "127.0.0.1"


def slurm_head_node(nodelist: str) -> str:
    """The first host of a SLURM node list, expanded by `scontrol show hostnames`."""
    if shutil.which("scontrol") is None:
        raise LaunchError(
            "under SLURM without MASTER_ADDR, and `scontrol` is not on PATH to resolve SLURM_JOB_NODELIST"
        )
    result = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False
    )
    hosts = result.stdout.split()
    if result.returncode != 0 or not hosts:
        raise LaunchError(f"`scontrol show hostnames {nodelist}` failed: {result.stderr.strip()}")
    return hosts[0]


def from_slurm(environ: Mapping[str, str]) -> DistEnv:
    if "SLURM_NTASKS" not in environ:
        raise LaunchError("SLURM_PROCID is set but SLURM_NTASKS is missing")
    addr = environ.get("MASTER_ADDR") or slurm_head_node(
        environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
    )
    env = DistEnv(
        rank=_int(environ, "SLURM_PROCID"),
        local_rank=_int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
        world_size=_int(environ, "SLURM_NTASKS"),
        master_addr=addr,
        master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else DEFAULT_PORT,
    )
    return _checked(env, "SLURM environment")


def detect_environment(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The DistEnv of this process, whichever launcher started it."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return from_torchrun(environ)
    if any(var in environ for var in MPI_RANK_VARS):
        return from_mpi(environ)
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return from_slurm(environ)
    return DistEnv(master_port=free_port())
