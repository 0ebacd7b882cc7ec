"""Training-step throughput: our Transformer against `transformers`' LlamaForCausalLM.

Both models get the same shape, weights, batch, dtype and optimizer (AdamW with our trainer's
kernel: fused), and are timed alternately in one run, so machine noise hits both alike; the
ratio is the figure to read.

Run:  python -m bench.train_step [--dim 256 --layers 4 --batch 8 --seq-len 256 --steps 10]
      [--compile] [--profile 15]
Needs `transformers` (the dev extra). Prints one JSON line per model and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from launch.cpu_allocator import keep_large_allocations
from model import ModelConfig, build_model
from model.hf.weights import save_model_as_hf
from trainer.optim import adamw_implementation


def timed_steps(step: object, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()  # type: ignore[operator]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add our model with every block torch.compile'd (inductor), timed in the same run",
    )
    parser.add_argument(
        "--profile", type=int, default=0, help="print the top N ops of one step of each model"
    )
    parser.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="leave glibc's malloc thresholds (scaletrain train raises them on CPU)",
    )
    args = parser.parse_args()
    if not args.malloc_defaults and not torch.cuda.is_available():
        keep_large_allocations()  # as `scaletrain train` does on CPU (launch/cpu_allocator.py)

    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = ModelConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        max_seq_len=args.seq_len,
    )
    ours = build_model(config, device, seed=0).to(dtype)
    with tempfile.TemporaryDirectory() as folder:
        save_model_as_hf(ours, folder, dtype=torch.float32)
        theirs = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="sdpa"
        ).to(device)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=generator).to(
        device
    )
    inputs, labels = batch[:, :-1], batch[:, 1:]

    # Both use our trainer's AdamW kernel (trainer.optim: fused on CUDA and CPU), which is also
    # transformers' Trainer default (`adamw_torch_fused` with torch >= 2.8).
    kernel = adamw_implementation(ours)

    def make_step(model: torch.nn.Module, forward: object) -> object:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **kernel)

        def step() -> float:
            logits = forward(inputs)  # type: ignore[operator]
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        return step

    steps = {
        "scaletrain": make_step(ours, ours),
        "transformers": make_step(theirs, lambda x: theirs(input_ids=x).logits),
    }
    compile_s = None
    if args.compile:
        compiled = build_model(config, device, seed=0).to(dtype)
        for block in compiled.layers:
            block.compile()
        steps["scaletrain-compiled"] = make_step(compiled, compiled)
    first_losses = {}
    for name, step in steps.items():  # warm-up (and compilation), and a parity check
        started = time.perf_counter()
        first_losses[name] = step()  # type: ignore[operator]
        if name == "scaletrain-compiled":
            compile_s = time.perf_counter() - started
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):  # alternate so that both see the same machine state
        for name, step in steps.items():
            times[name] += timed_steps(step, 1)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()  # type: ignore[operator]
            print(f"# {name}: top {args.profile} ops of one step by self CPU time")
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile)
            print(table)
    tokens = args.batch * args.seq_len
    results = {}
    for name, values in times.items():
        median = statistics.median(values)
        results[name] = tokens / median
        print(
            json.dumps(
                {
                    "model": name,
                    "device": device,
                    "dtype": args.dtype,
                    "tokens_per_step": tokens,
                    "median_step_s": median,
                    "tokens_per_s": tokens / median,
                    "first_loss": first_losses[name],
                }
            )
        )
    ratios = {"ratio_scaletrain_over_transformers": results["scaletrain"] / results["transformers"]}
    if args.compile:
        ratios["ratio_compiled_over_eager"] = results["scaletrain-compiled"] / results["scaletrain"]
        ratios["first_compiled_step_s"] = compile_s
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
