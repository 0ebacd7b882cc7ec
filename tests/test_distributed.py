"""Distributed training on CPU with gloo: ZeRO stages, world sizes and launchers agree.

Every run trains the same config (one seed, one global batch) and the per-step losses must be
equal to the 1-rank ZeRO-0 run within 1e-5 relative.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from launch.environment import LaunchError, detect_environment
from launch.slurm import SlurmJob, sbatch_script
from tests.helpers import read_metrics, small_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 10


def rank_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    # Two ranks on two cores: one thread each, as torchrun does by default.
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def write_config(tmp_path: Path, corpus: Path, name: str, **parallel: object) -> Path:
    config = small_config(
        tmp_path / name,
        corpus,
        train={"max_steps": STEPS, "eval_every": 0, "global_batch_tokens": 1024},
        parallel={"zero_stage": 0, "precision": "fp32", **parallel},
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(cmd: list[str], timeout: int = 420) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=rank_env(), timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    return result


def torchrun(config: Path, nproc: int) -> None:
    run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "launch.cli",
            "train",
            str(config),
        ]
    )


def losses(run_dir: Path) -> list[float]:
    lines, _ = read_metrics(run_dir)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    return [line["loss"] for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, list[float]]:
    """1 rank, ZeRO-0: the run every other setup must reproduce."""
    tmp_path = tmp_path_factory.mktemp("reference")
    config = write_config(tmp_path, corpus, "single")
    run([sys.executable, "-m", "launch.cli", "train", str(config)])
    return tmp_path / "single", losses(tmp_path / "single")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_rank_at_every_zero_stage(
    stage: int, tmp_path: Path, corpus: Path, reference: tuple[Path, list[float]]
) -> None:
    reference_dir, expected = reference
    config = write_config(tmp_path, corpus, f"zero{stage}", zero_stage=stage)
    torchrun(config, nproc=2)
    assert losses(tmp_path / f"zero{stage}") == pytest.approx(expected, rel=1e-5)
    state = json.loads(
        (tmp_path / f"zero{stage}/checkpoints/step_{STEPS:08d}/trainer_state.json").read_text()
    )
    assert state["world_size"] == 2 and state["zero_stage"] == stage
    if stage == 3:  # the gathered parameters equal the 1-rank run's
        ours = load_file(tmp_path / f"zero{stage}/checkpoints/step_{STEPS:08d}/model.safetensors")
        theirs = load_file(reference_dir / f"checkpoints/step_{STEPS:08d}/model.safetensors")
        assert ours.keys() == theirs.keys()
        # Relative in norm: Adam turns reduction-order noise in near-zero gradients into
        # lr-sized element flips, so an elementwise max is the wrong yardstick.
        relative = {name: ((ours[name] - t).norm() / t.norm()).item() for name, t in theirs.items()}
        worst = max(relative, key=relative.__getitem__)
        assert relative[worst] <= 1e-5, (worst, relative[worst])


def test_cpu_offload_on_two_ranks_matches(
    tmp_path: Path, corpus: Path, reference: tuple[Path, list[float]]
) -> None:
    config = write_config(tmp_path, corpus, "offload", zero_stage=2, offload="cpu")
    torchrun(config, nproc=2)
    assert losses(tmp_path / "offload") == pytest.approx(reference[1], rel=1e-5)


def test_bf16_trains_close_to_fp32(
    tmp_path: Path, corpus: Path, reference: tuple[Path, list[float]]
) -> None:
    config = write_config(tmp_path, corpus, "bf16", zero_stage=1, precision="bf16")
    raw = yaml.safe_load(config.read_text())
    raw["train"]["max_steps"] = 3  # bf16 matmuls are slow on CPUs without AMX
    config.write_text(yaml.safe_dump(raw))
    run([sys.executable, "-m", "launch.cli", "train", str(config)])
    lines, _ = read_metrics(tmp_path / "bf16")
    assert [line["loss"] for line in lines] == pytest.approx(reference[1][:3], rel=5e-3)
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_fp16_without_cuda_is_refused(tmp_path: Path, corpus: Path) -> None:
    config = write_config(tmp_path, corpus, "fp16", precision="fp16")
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=rank_env(),
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "scaletrain: error: parallel.precision: fp16 needs a CUDA device (DeepSpeed's CPU accelerator "
        "has no fp16); use bf16 or fp32"
    )


def test_activation_checkpointing_gives_the_same_losses(
    tmp_path: Path, corpus: Path, reference: tuple[Path, list[float]]
) -> None:
    config = write_config(tmp_path, corpus, "ac", activation_checkpointing="full")
    run([sys.executable, "-m", "launch.cli", "train", str(config)])
    assert losses(tmp_path / "ac") == pytest.approx(reference[1], rel=1e-5)


def test_two_nodes_on_loopback_match(
    tmp_path: Path, corpus: Path, reference: tuple[Path, list[float]]
) -> None:
    """torchrun --nnodes 2 --nproc-per-node 1, twice, with a c10d rendezvous on 127.0.0.1."""
    from trainer.distributed import free_port

    config = write_config(tmp_path, corpus, "nodes", zero_stage=2)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [
                str(BIN / "torchrun"),
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}",
                "--rdzv-id=scaletrain-test",
                "--max-restarts=0",
                "-m",
                "launch.cli",
                "train",
                str(config),
            ],
            cwd=ROOT,
            env=rank_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [node.communicate(timeout=420)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert losses(tmp_path / "nodes") == pytest.approx(reference[1], rel=1e-5)


@pytest.mark.skipif(
    not (BIN / "mpiexec").exists(), reason="no mpiexec next to the interpreter (pip install mpich)"
)
def test_mpiexec_trains_and_matches(
    tmp_path: Path, corpus: Path, reference: tuple[Path, list[float]]
) -> None:
    config = write_config(tmp_path, corpus, "mpi", zero_stage=1)
    run([str(BIN / "mpiexec"), "-n", "2", sys.executable, "-m", "launch.cli", "train", str(config)])
    assert losses(tmp_path / "mpi") == pytest.approx(reference[1], rel=1e-5)


def test_environment_detection() -> None:
    torchrun_env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "1234",
    }
    env = detect_environment(torchrun_env)
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port) == (
        3,
        1,
        4,
        "10.0.0.1",
        1234,
    )
    with pytest.raises(LaunchError, match="MASTER_ADDR, MASTER_PORT missing"):
        detect_environment({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="rank 5 is outside world size 4"):
        detect_environment({**torchrun_env, "RANK": "5"})
    slurm = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "MASTER_ADDR": "node7"}
    env = detect_environment(slurm)
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (2, 4, "node7", 29500)
    if shutil.which("scontrol") is None:
        with pytest.raises(LaunchError, match="scontrol"):
            detect_environment(
                {k: v for k, v in slurm.items() if k != "MASTER_ADDR"}
                | {"SLURM_JOB_NODELIST": "n[1-2]"}
            )
    assert detect_environment({}).world_size == 1


def test_missing_mpi_library_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails as with no MPI library
    with pytest.raises(LaunchError, match=r"mpi4py cannot load an MPI library .*pip install mpich"):
        detect_environment({"PMI_RANK": "0", "PMI_SIZE": "2"})


def test_world_size_must_divide_the_global_batch(tmp_path: Path, corpus: Path) -> None:
    config = write_config(tmp_path, corpus, "bad")  # 1024 tokens / 64 = 16 sequences
    result = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc-per-node=3",
            "-m",
            "launch.cli",
            "train",
            str(config),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=rank_env(),
        timeout=300,
    )
    assert result.returncode != 0
    assert "scaletrain: error:" in result.stderr
    assert "16 sequences per step do not split over 3 ranks" in result.stderr
    assert "trainer/trainer.py" not in result.stderr  # one line from each rank, no traceback


def test_sbatch_script(tmp_path: Path) -> None:
    from launch.cli import main

    out = tmp_path / "job.sbatch"
    assert (
        main(
            [
                "launch",
                "slurm",
                str(ROOT / "configs/tiny.yaml"),
                "--nodes",
                "4",
                "--gpus-per-node",
                "8",
                "--out",
                str(out),
                "--partition",
                "gpu",
                "--set",
                "train.lr=1e-3",
            ]
        )
        == 0
    )
    script = out.read_text()
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --partition=gpu" in script
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "srun --kill-on-bad-exit=1 torchrun" in script
    for argument in (
        '--nnodes "$SLURM_NNODES"',
        "--nproc-per-node 8",
        "--rdzv-backend c10d",
        '--rdzv-endpoint "$head_node_ip:29500"',
        '--rdzv-id "$SLURM_JOB_ID"',
        "--max-restarts 3",
    ):
        assert argument in script
    assert script.rstrip().endswith(
        f"--no-python scaletrain train {ROOT / 'configs/tiny.yaml'} --set train.lr=1e-3"
    )
    assert (
        main(
            [
                "launch",
                "slurm",
                str(ROOT / "configs/tiny.yaml"),
                "--nodes",
                "3",
                "--gpus-per-node",
                "5",
            ]
        )
        == 2
    )


def test_sbatch_job_validation() -> None:
    with pytest.raises(ValueError, match="--nodes"):
        SlurmJob(config="c.yaml", nodes=0, gpus_per_node=1)
    assert "--gpus-per-node=2" in sbatch_script(SlurmJob(config="c.yaml", nodes=1, gpus_per_node=2))
