"""`scaletrain launch slurm`: write an sbatch script that runs `srun torchrun` on every node."""

from __future__ import annotations

import shlex
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

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes: must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node: must be >= 1, got {self.gpus_per_node}")


def sbatch_script(job: SlurmJob) -> str:
    """The script text. One task per node; torchrun spawns the GPU ranks and restarts them."""
    directives = [
        f"#SBATCH --job-name={job.job_name}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={job.gpus_per_node}",
        f"#SBATCH --cpus-per-task={job.cpus_per_task}",
        f"#SBATCH --time={job.time}",
        "#SBATCH --output=%x-%j.out",
        # SIGTERM to the job step two minutes before the time limit: torchrun passes it to
        # every rank, and scaletrain saves a checkpoint and exits (SIGUSR1 works the same).
        "#SBATCH --signal=TERM@120",
    ]
    if job.partition:
        directives.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        directives.append(f"#SBATCH --account={job.account}")
    overrides = "".join(f" --set {shlex.quote(o)}" for o in job.overrides)
    return "\n".join(
        [
            "#!/bin/bash",
            *directives,
            "set -euo pipefail",
            "",
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
