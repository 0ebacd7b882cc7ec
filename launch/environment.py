"""Turn the launcher's environment into one DistEnv (rank, local rank, world size, master)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from trainer.distributed import DistEnv, free_port


class LaunchError(ValueError):
    """The launcher environment is incomplete or inconsistent; the message says what is missing."""


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise LaunchError(f"{key}={environ[key]!r} is not an integer") from None


def detect_environment(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read torchrun-style variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Without them this is a single process, given a free local port.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
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
        if not 0 <= env.rank < env.world_size:
            raise LaunchError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}")
        return env
    return DistEnv(master_port=free_port())
