"""AdamW kernels on one model: the per-parameter loop, `foreach` and `fused`, side by side.

The three optimizers step copies of the same model with the same gradients, interleaved step by
step (so machine noise hits all alike); the optimizer step alone is timed. After the run the
weights of `foreach` and `fused` are compared with the loop's (the previous path): `foreach`
gives the loop's bits, `fused` rounds differently within ~1e-8 per update.

Run:  python -m bench.optimizer [--dim 512 --layers 8 --steps 7 --threads 0]
Prints one JSON line per kernel (median step seconds, ratio to the loop, max |weight - loop|).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from model import ModelConfig, build_model
from trainer.config import TrainConfig
from trainer.optim import param_groups

KERNELS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = ModelConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=8,
        n_kv_heads=4,
        max_seq_len=256,
    )
    train = TrainConfig(lr=3e-4, weight_decay=0.1)
    models, optimizers = {}, {}
    for name, kwargs in KERNELS.items():
        models[name] = build_model(config, seed=0)
        optimizers[name] = torch.optim.AdamW(
            param_groups(models[name], train.weight_decay),
            lr=train.lr,
            betas=(train.beta1, train.beta2),
            eps=train.eps,
            **kwargs,
        )
    n_params = sum(p.numel() for p in models["loop"].parameters())
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in KERNELS}
    for _ in range(args.steps):
        grads = [
            torch.randn(p.shape, generator=generator) * 1e-3 for p in models["loop"].parameters()
        ]
        for name in KERNELS:
            for param, grad in zip(models[name].parameters(), grads, strict=True):
                param.grad = grad.clone()
            started = time.perf_counter()
            optimizers[name].step()
            times[name].append(time.perf_counter() - started)
    loop = torch.cat([p.detach().flatten() for p in models["loop"].parameters()])
    base = statistics.median(times["loop"])
    for name in KERNELS:
        weights = torch.cat([p.detach().flatten() for p in models[name].parameters()])
        median = statistics.median(times[name])
        print(
            json.dumps(
                {
                    "kernel": name,
                    "parameters": n_params,
                    "steps": args.steps,
                    "median_step_s": round(median, 5),
                    "time_vs_loop": round(median / base, 3),
                    "max_abs_diff_vs_loop": float((weights - loop).abs().max()),
                }
            )
        )


if __name__ == "__main__":
    main()
