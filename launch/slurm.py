"""`scaletrain launch slurm`: write an sbatch script that runs `srun torchrun` on every node."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class SlurmJob:
    """What the sbatch script asks SLURM for."""

    config: str
    nodes: int
    gpus_per_node: int
    job_name: str = "scaletrain"
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int = 16
    port: int = 29500
    max_restarts: int = 3
    overrides: tuple[str, ...] = ()
    workdir: str | None = None  # where relative paths (config, run.dir) resolve
    log_dir: str | None = None  # where SLURM writes the job's output (default: workdir)
    activate: tuple[str, ...] = ()  # shell lines that enter the Python environment

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes: must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node: must be >= 1, got {self.gpus_per_node}")


def activation_lines(
    environ: Mapping[str, str] | None = None,
    prefix: str | None = None,
    base_prefix: str | None = None,
) -> tuple[str, ...]:
    """Shell lines that enter the Python environment this process runs in, so the job finds
    the same `scaletrain`: a virtualenv (VIRTUAL_ENV, or a venv's interpreter run directly),
    else a conda env (CONDA_PREFIX); nothing for a system Python."""
    environ = os.environ if environ is None else environ
    prefix = sys.prefix if prefix is None else prefix
    base_prefix = sys.base_prefix if base_prefix is None else base_prefix
    venv = environ.get("VIRTUAL_ENV") or (prefix if prefix != base_prefix else None)
    if venv:
        return (f"source {shlex.quote(os.path.join(venv, 'bin', 'activate'))}",)
    conda_prefix = environ.get("CONDA_PREFIX")
    if conda_prefix:
        conda_exe = environ.get("CONDA_EXE")
        if conda_exe:  # <base>/bin/conda -> <base>/etc/profile.d/conda.sh defines `conda activate`
            base = os.path.dirname(os.path.dirname(conda_exe))
            hook = os.path.join(base, "etc", "profile.d", "conda.sh")
            return (f"source {shlex.quote(hook)}", f"conda activate {shlex.quote(conda_prefix)}")
        return (f'export PATH={shlex.quote(os.path.join(conda_prefix, "bin"))}:"$PATH"',)
    return ()


def sbatch_script(job: SlurmJob) -> str:
    """The script text. One task per node; torchrun spawns the GPU ranks and restarts them."""
    directives = [
        f"#SBATCH --job-name={job.job_name}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={job.gpus_per_node}",
        f"#SBATCH --cpus-per-task={job.cpus_per_task}",
        f"#SBATCH --time={job.time}",
        f"#SBATCH --output={os.path.join(job.log_dir, '') if job.log_dir else ''}%x-%j.out",
        # SIGTERM to the job step two minutes before the time limit: torchrun passes it to
        # every rank, and scaletrain saves a checkpoint and exits (SIGUSR1 works the same).
        "#SBATCH --signal=TERM@120",
    ]
    if job.partition:
        directives.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        directives.append(f"#SBATCH --account={job.account}")
    if job.workdir:
        directives.append(f"#SBATCH --chdir={job.workdir}")
    environment = (
        ["", "# The Python environment `scaletrain launch slurm` ran in.", *job.activate]
        if job.activate
        else []
    )
    overrides = "".join(f" --set {shlex.quote(o)}" for o in job.overrides)
    return "\n".join(
        [
            "#!/bin/bash",
            *directives,
            *environment,
            "",
            "set -euo pipefail",
            "# The first host of the allocation is the c10d rendezvous head.",
            'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            "head_node_ip=$(srun --nodes=1 --ntasks=1 -w \"$head_node\" hostname --ip-address | awk '{print $1}')",
            f"export OMP_NUM_THREADS={max(1, job.cpus_per_task // job.gpus_per_node)}",
            "",
            "srun --kill-on-bad-exit=1 torchrun \\",
            '  --nnodes "$SLURM_NNODES" \\',
            f"  --nproc-per-node {job.gpus_per_node} \\",
            '  --rdzv-id "$SLURM_JOB_ID" \\',
            "  --rdzv-backend c10d \\",
            f'  --rdzv-endpoint "$head_node_ip:{job.port}" \\',
            f"  --max-restarts {job.max_restarts} \\",
            f"  --no-python scaletrain train {shlex.quote(job.config)}{overrides}",
            "",
        ]
    )
