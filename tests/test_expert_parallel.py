"""Expert parallelism on CPU with gloo: the all-to-all layer, and whole runs against 1 rank.

The dispatch test runs the MoE layer on 2 (and 4) ranks that each route their own tokens and
checks outputs and gradients against the same layer computing every expert locally. The run
tests train `tiny-moe`-shaped models through the CLI: expert_parallel 2 at every ZeRO stage must
give the 1-rank losses within 1e-5 relative.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from model import build_model
from model.config import ModelConfig
from model.moe.layer import MoEFeedForward
from tests.helpers import TINY_MOE_MODEL as TINY_MOE
from tests.helpers import read_metrics, small_config
from tests.test_distributed import BIN, ROOT, rank_env, run, torchrun
from tests.test_moe import moe_config
from trainer.expert_parallel import (
    AllToAllDispatcher,
    apply_expert_parallel,
    check_expert_parallel,
    update_router_biases,
)

STEPS = 8


def layer_config(**overrides: object) -> ModelConfig:
    return moe_config(**{"n_layers": 1, **overrides})


def _moe(config: ModelConfig) -> MoEFeedForward:
    return build_model(config, seed=3).moe_layers()[0].train()


def _dispatch_worker(rank: int, world: int, init_file: str, case: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    overrides: dict[str, object] = {"n_experts": 8} if world == 4 else {}
    if case == "capacity":
        overrides["capacity_factor"] = 0.75
    if case == "skewed":  # every token picks experts 0 and 1: rank 1 of 2 receives no rows
        overrides["aux_free_bias_update_rate"] = 0.1
    config = layer_config(**overrides)
    ours, reference = _moe(config), _moe(config)
    if case == "skewed":
        for moe in (ours, reference):
            assert moe.router.expert_bias is not None
            moe.router.expert_bias.copy_(
                torch.tensor([50.0, 50.0] + [0.0] * (config.n_experts - 2))
            )
    ours.dispatcher = AllToAllDispatcher(dist.group.WORLD, config.n_experts)
    x = torch.randn(2, 8 + 3 * rank, 32, generator=torch.Generator().manual_seed(rank))
    out = ours(x.clone().requires_grad_())
    expected = reference(x.clone().requires_grad_())
    (out * (rank + 1)).sum().backward()
    (expected * (rank + 1)).sum().backward()
    grads = {}
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        grads[name] = param.grad.clone()
        dist.all_reduce(grads[name])  # the data-parallel sum DeepSpeed will take
        ref_grad = reference.get_parameter(name).grad
        assert ref_grad is not None
        dist.all_reduce(ref_grad)
        grads[f"ref.{name}"] = ref_grad
    torch.save(
        {
            "out": out.detach(),
            "expected": expected.detach(),
            "grads": grads,
            "dropped": (ours.dropped_tokens, reference.dropped_tokens),
        },
        f"{out_dir}/rank{rank}.pt",
    )
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("world", "case"), [(2, "plain"), (2, "capacity"), (2, "skewed"), (4, "plain")]
)
def test_all_to_all_layer_equals_local_experts(world: int, case: str, tmp_path: Path) -> None:
    """Outputs equal, and the summed gradients of every parameter equal, with the experts
    computed on their owners: uneven token counts per rank, capacity drops, a rank that
    receives nothing."""
    mp.start_processes(
        _dispatch_worker,
        args=(world, str(tmp_path / "init"), case, str(tmp_path)),
        nprocs=world,
        start_method="spawn",
    )
    for rank in range(world):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["out"], result["expected"], atol=1e-6, rtol=1e-5)
        dropped, ref_dropped = result["dropped"]
        assert dropped == ref_dropped and (dropped > 0) == (case == "capacity")
        grads = result["grads"]
        for name in [n for n in grads if not n.startswith("ref.")]:
            torch.testing.assert_close(grads[name], grads[f"ref.{name}"], atol=1e-6, rtol=1e-5)
            assert grads[name].abs().sum() > 0, name


def test_check_expert_parallel_names_the_problem() -> None:
    assert check_expert_parallel(1, 0, 3) is None
    assert check_expert_parallel(2, 8, 4) is None
    assert "needs an MoE model" in str(check_expert_parallel(2, 0, 2))
    assert "does not divide the world size 3" in str(check_expert_parallel(2, 8, 3))
    assert "does not divide model.n_experts 6" in str(check_expert_parallel(4, 6, 4))


def test_router_bias_moves_by_the_summed_load_once_per_step() -> None:
    """One process: update_router_biases applies the recorded load once, then clears it."""
    model = build_model(layer_config(aux_free_bias_update_rate=0.1), seed=0).train()
    moe = model.moe_layers()[0]
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    model(tokens)
    model(tokens)  # two micro-batches: the bias does not move inside a step
    assert moe.router.expert_bias is not None and moe.router.expert_load is not None
    assert moe.router.expert_bias.abs().sum() == 0
    load = moe.router.expert_load.clone()
    assert load.sum() == 2 * 2 * 16 * 2  # 2 forwards x 32 tokens x top-2
    update_router_biases(model)
    torch.testing.assert_close(moe.router.expert_bias, 0.1 * torch.sign(load.mean() - load))
    assert moe.router.expert_load.abs().sum() == 0
    assert apply_expert_parallel(model, 1) == 0  # ep 1 changes nothing


MOE_MODEL = {
    **TINY_MOE,
    "capacity_factor": 1.25,  # per-forward capacity: equal when the micro-batch is
    "aux_free_bias_update_rate": 0.01,  # global load, once per step
}


def moe_run_config(tmp_path: Path, corpus: Path, name: str, **parallel: object) -> Path:
    config = small_config(
        tmp_path / name,
        corpus,
        model=MOE_MODEL,
        train={
            "max_steps": STEPS,
            "eval_every": 0,
            "global_batch_tokens": 1024,
            "micro_batch_size": 4,  # 1 rank: 4 micro-steps; 2 ranks: 2 each
        },
        parallel={"zero_stage": 0, "precision": "fp32", **parallel},
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def moe_losses(run_dir: Path) -> list[float]:
    lines, _ = read_metrics(run_dir)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert all(line["moe_dropped_tokens"] >= 0 for line in lines)
    return [line["loss"] for line in lines]


@pytest.fixture(scope="module")
def moe_reference(
    tmp_path_factory: pytest.TempPathFactory, corpus: Path
) -> tuple[Path, list[float]]:
    tmp_path = tmp_path_factory.mktemp("moe-reference")
    config = moe_run_config(tmp_path, corpus, "single")
    run([sys.executable, "-m", "launch.cli", "train", str(config)])
    return tmp_path / "single", moe_losses(tmp_path / "single")


@pytest.mark.parametrize(
    ("stage", "ep"),
    [
        (1, 1),
        (0, 2),
        (1, 2),
        pytest.param(2, 2, marks=pytest.mark.slow),
        (3, 2),
    ],
)
def test_tiny_moe_on_two_ranks_matches_one_rank(
    stage: int, ep: int, tmp_path: Path, corpus: Path, moe_reference: tuple[Path, list[float]]
) -> None:
    reference_dir, expected = moe_reference
    name = f"zero{stage}-ep{ep}"
    config = moe_run_config(tmp_path, corpus, name, zero_stage=stage, expert_parallel=ep)
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "launch.cli"]
    result = run([*launcher, "train", str(config)])
    dispatch = "MoE layers dispatch tokens all-to-all over groups of 2 ranks"
    assert (dispatch in result.stderr + result.stdout) == (ep == 2)
    assert moe_losses(tmp_path / name) == pytest.approx(expected, rel=1e-5)
    final = f"checkpoints/step_{STEPS:08d}/model.safetensors"
    ours, theirs = load_file(tmp_path / name / final), load_file(reference_dir / final)
    assert ours.keys() == theirs.keys()
    # Experts trained on their owners' ranks end where the 1-rank run's did (relative in norm).
    for key in [k for k in theirs if "experts." in k or "expert_bias" in k]:
        difference = (ours[key] - theirs[key]).norm() / theirs[key].norm().clamp(min=1e-12)
        assert difference <= 1e-5, key


def test_four_ranks_expert_parallel_two_with_expert_data_parallel(
    tmp_path: Path, corpus: Path, moe_reference: tuple[Path, list[float]]
) -> None:
    """4 ranks = 2 expert-parallel groups of 2: each expert block trained by 2 ranks."""
    config = moe_run_config(tmp_path, corpus, "ep2x2", zero_stage=1, expert_parallel=2)
    raw = yaml.safe_load(config.read_text())
    raw["train"]["micro_batch_size"] = 4  # 1 micro-step per rank
    config.write_text(yaml.safe_dump(raw))
    torchrun(config, nproc=4)
    assert moe_losses(tmp_path / "ep2x2") == pytest.approx(moe_reference[1], rel=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.expert_parallel=2", "model.n_experts=0"], "needs an MoE model"),
        (["parallel.expert_parallel=4"], "does not divide the world size 2"),
        (["parallel.expert_parallel=2", "model.n_experts=3", "model.top_k=1"], "n_experts 3"),
    ],
)
def test_bad_expert_parallel_setups_fail_with_one_line(
    overrides: list[str], message: str, tmp_path: Path, corpus: Path
) -> None:
    config = moe_run_config(tmp_path, corpus, "bad")
    sets = [arg for item in overrides for arg in ("--set", item)]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "train",
            str(config),
            "--dry-run",
            "--world-size",
            "2",
            *sets,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=rank_env(),
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.slow
def test_expert_parallel_resume_is_bit_exact(tmp_path: Path, corpus: Path) -> None:
    """2 ranks, expert_parallel 2, ZeRO-1: 8 steps straight == 4, a crash after step 6, and a
    resume from step 4 (weights, optimizer, routing biases and data position)."""
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "launch.cli"]
    straight = moe_run_config(tmp_path, corpus, "straight", zero_stage=1, expert_parallel=2)
    run([*launcher, "train", str(straight)])
    crashed = moe_run_config(tmp_path, corpus, "crashed", zero_stage=1, expert_parallel=2)
    raw = yaml.safe_load(crashed.read_text())
    raw["checkpoint"]["every"] = 4
    crashed.write_text(yaml.safe_dump(raw))
    failed = subprocess.run(
        [*launcher, "train", str(crashed), "--fail-at-step", "6"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=rank_env(),
        timeout=420,
    )
    assert failed.returncode != 0
    assert (tmp_path / "crashed/checkpoints/latest").read_text().strip() == "step_00000004"
    run([*launcher, "train", str(crashed)])
    expected, resumed = (
        read_metrics(tmp_path / "straight")[0],
        read_metrics(tmp_path / "crashed")[0],
    )
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in expected]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in expected]
