"""Per-rank model-state memory under ZeRO 0-3 on 2 ranks, measured against the estimate.

Run:  torchrun --standalone --nproc-per-node 2 -m bench.zero_memory [--stage 0..3]
(`python -m bench.zero_memory --all` runs every stage, each under its own torchrun.)

After one optimizer step and a second backward (gradients live, activations released), every
live tensor the rank holds is found through the garbage collector and counted once per
storage: parameters (full, or the rank's ZeRO-3 partition), gradients, fp32 master copies,
Adam moments and DeepSpeed's communication buffers. `trainer.planning.memory.model_state_memory`
estimates the first four from the formula; the gap is what DeepSpeed adds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch


def live_tensor_bytes() -> int:
    """Bytes of all live tensor storages in this process, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
        except (ReferenceError, RuntimeError):
            continue
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def measure(stage: int, dim: int, n_layers: int) -> dict[str, float]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from launch.environment import detect_environment
    from model import ModelConfig, build_model
    from trainer.config import JobConfig
    from trainer.deepspeed_config import build_deepspeed_config
    from trainer.distributed import deepspeed, init_distributed
    from trainer.optim import build_optimizer
    from trainer.planning.memory import model_state_memory

    env = detect_environment()
    init_distributed(env, "gloo")
    config = JobConfig()
    config.parallel.zero_stage = stage
    model_config = ModelConfig(
        vocab_size=4096, dim=dim, n_layers=n_layers, n_heads=8, n_kv_heads=8, max_seq_len=64
    )
    model = build_model(model_config, "cpu", seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    rope_bytes = model.rope_cos.nbytes + model.rope_sin.nbytes
    ds = build_deepspeed_config(
        config.parallel, config.train.grad_clip, 1, 1, env.world_size, "fp32"
    )
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, config.train),
        config=ds,
        dist_init_required=False,
    )
    tokens = torch.randint(0, 4096, (1, 33))
    loss = torch.nn.functional.cross_entropy(
        engine(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()
    )
    engine.backward(loss)
    engine.step()  # the first step creates the optimizer states
    loss = torch.nn.functional.cross_entropy(
        engine(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()
    )
    engine.backward(loss)  # gradients are live now, activations released: the model-state peak
    del loss
    gc.collect()
    measured = live_tensor_bytes() - rope_bytes - tokens.nbytes
    estimate = model_state_memory(n_params, stage, env.world_size, "fp32")
    return {
        "stage": stage,
        "rank": env.rank,
        "params": n_params,
        "measured_mib": measured / 2**20,
        "estimate_mib": estimate.device_bytes / 2**20,
        "ratio": measured / estimate.device_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--all", action="store_true", help="run stages 0-3, each on 2 ranks")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    if args.all:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        for stage in range(4):
            subprocess.run(
                [
                    torchrun,
                    "--standalone",
                    "--nproc-per-node=2",
                    "-m",
                    "bench.zero_memory",
                    "--stage",
                    str(stage),
                    "--dim",
                    str(args.dim),
                    "--layers",
                    str(args.layers),
                ],
                check=True,
            )
        return
    result = measure(args.stage, args.dim, args.layers)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
