"""Peak memory and time of one training step: chunked cross-entropy against the plain one.

Each (vocab, loss) case runs in a fresh process, so that one case's freed pages do not hide
another's peak. A step is forward (`Transformer.hidden_states`), the loss, backward and an
AdamW step, with gradients and optimizer state already allocated. Memory: on CUDA
`torch.cuda.max_memory_allocated` over the step minus what was allocated before it; on CPU the
process's peak resident set (`ru_maxrss`) after the step minus its resident set before it (the
process is at its peak so far then; tensors over 32 MiB are mmapped by glibc and returned at
free, so the peak RSS follows the peak of live tensors).

Run:  python -m bench.loss_memory [--vocabs 32768 131072 --tokens 1024 --dim 256 --layers 2]
Prints one JSON line per case and one per vocabulary with the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def run_case(args: argparse.Namespace) -> dict[str, float | int | str]:
    from model import ModelConfig, build_model
    from trainer.losses.cross_entropy import chunked_cross_entropy_sum, cross_entropy_sum

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    config = ModelConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=max(1, args.dim // 64),
        max_seq_len=args.tokens,
    )
    model = build_model(config, device, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
    generator = torch.Generator().manual_seed(0)  # the same batch in every case
    tokens = torch.randint(0, args.vocab, (1, args.tokens + 1), generator=generator).to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        hidden = model.hidden_states(inputs)
        if args.loss == "chunked":
            loss = chunked_cross_entropy_sum(hidden, model.output_weight, labels, args.chunk)
        else:
            loss = cross_entropy_sum(
                torch.nn.functional.linear(hidden, model.output_weight), labels
            )
        (loss / labels.numel()).backward()
        optimizer.step()
        return loss.item() / labels.numel()

    # Gradients and optimizer state exist before the measured step (as in a steady-state step):
    # a zero-gradient AdamW step without decay creates them and leaves the weights unchanged.
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    started = time.perf_counter()
    loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if cuda:
        peak_extra = torch.cuda.max_memory_allocated() - before
    else:  # ru_maxrss is in KiB on Linux; before the step the process was at its peak so far
        peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "vocab": args.vocab,
        "loss_kind": args.loss,
        "tokens": args.tokens,
        "device": device,
        "step_peak_extra_mib": round(peak_extra / 2**20, 1),
        "step_s": round(seconds, 3),
        "loss": round(loss, 6),
        "full_logits_fp32_mib": round(args.tokens * args.vocab * 4 / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--case", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        args.loss = args.case
        print(json.dumps(run_case(args)))
        return
    for vocab in args.vocabs:
        results = {}
        for kind in ("plain", "chunked"):
            command = [sys.executable, "-m", "bench.loss_memory", "--case", kind]
            for flag, value in (
                ("--vocab", vocab),
                ("--tokens", args.tokens),
                ("--dim", args.dim),
                ("--layers", args.layers),
                ("--chunk", args.chunk),
            ):
                command += [flag, str(value)]
            out = subprocess.run(
                command,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            print(out, flush=True)
            results[kind] = json.loads(out.splitlines()[-1])
        plain, chunked = results["plain"], results["chunked"]
        print(
            json.dumps(
                {
                    "vocab": vocab,
                    "peak_extra_chunked_over_plain": chunked["step_peak_extra_mib"]
                    / max(plain["step_peak_extra_mib"], 1e-9),
                    "time_chunked_over_plain": chunked["step_s"] / plain["step_s"],
                    "loss_difference": abs(chunked["loss"] - plain["loss"]),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
