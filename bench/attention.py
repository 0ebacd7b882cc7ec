"""Attention paths side by side: dense mask vs blocked (CPU), flex and varlen (CUDA).

One attention call (B=1, fp32, forward + backward) per row at each sequence length, for a
sliding window alone, the window with packed documents (8 random cut points), and documents
alone (CPU: the per-document path); full causal SDPA
is the yardstick. All rows run interleaved in one process after warm-ups, so machine noise hits
them alike; medians are reported. `--train-step` adds whole training steps (forward, backward,
AdamW) of the `tiny` preset with a window at 4x its sequence length.

Run:  python -m bench.attention [--seqs 4096 8192 16384 --window 256 --docs 8 --repeats 5]
Prints one JSON line per row, then the growth ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from launch.cpu_allocator import keep_large_allocations
from model import ModelConfig, build_model
from model.attention_paths import AttentionSpec, attend
from model.presets import PRESETS
from trainer.losses.cross_entropy import chunked_cross_entropy_sum
from trainer.optim import adamw_implementation


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def attention_case(
    seq: int, heads: int, head_dim: int, window: int | None, docs: int, path: str | None
) -> Callable[[], None]:
    """One forward + backward of `attend` on fixed random inputs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, seq, head_dim, device=device, generator=generator).requires_grad_()
        for _ in range(3)
    )
    doc_ids = None
    if docs:
        # Documents of random lengths: `docs` sorted cut points.
        cuts = torch.randint(1, seq, (docs - 1,), generator=generator, device=device)
        doc_ids = torch.zeros(seq, dtype=torch.long, device=device)
        doc_ids[cuts] = 1
        doc_ids = doc_ids.cumsum(0)[None]

    def run() -> None:
        spec = AttentionSpec(seq_len=seq, doc_ids=doc_ids, force_path=path)
        out = attend(q, k, v, spec, window)
        out.sum().backward()
        _sync()

    return run


def train_step_case(
    seq: int, batch: int, window: int | None, path: str | None, loss_chunk: int = 0
) -> Callable[[], None]:
    """A training step of `tiny` (vocab 4096): forward, cross-entropy, backward, AdamW.

    `loss_chunk` > 0: the loss of `train.loss_chunk_tokens` (never the full logits)."""
    shape = {**PRESETS["tiny"], "max_seq_len": seq, "sliding_window": window}
    model = build_model(ModelConfig(vocab_size=4096, **shape), seed=0)
    model.attention_path = path
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw_implementation(model))
    tokens = torch.randint(0, 4096, (batch, seq + 1), generator=torch.Generator().manual_seed(0))

    def run() -> None:
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        if loss_chunk:
            hidden = model.hidden_states(inputs)
            loss = chunked_cross_entropy_sum(hidden, model.output_weight, labels, loss_chunk)
            loss = loss / labels.numel()
        else:
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def measure(cases: dict[str, Callable[[], None]], warmups: int, repeats: int) -> dict[str, float]:
    """Median seconds per case, the cases interleaved round-robin."""
    for _ in range(warmups):
        for run in cases.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmups", type=int, default=1)
    parser.add_argument(
        "--dense-max", type=int, default=8192, help="longest sequence for the O(T^2) rows"
    )
    parser.add_argument("--train-step", action="store_true", help="also time tiny train steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="leave glibc's malloc thresholds (scaletrain train raises them on CPU)",
    )
    args = parser.parse_args()
    if not args.malloc_defaults and not torch.cuda.is_available():
        keep_large_allocations()  # as `scaletrain train` does on CPU (launch/cpu_allocator.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    fast = ["flex"] if cuda else ["blocked"]
    medians: dict[int, dict[str, float]] = {}
    for seq in args.seqs:
        cases: dict[str, Callable[[], None]] = {}
        h, d, w, n = args.heads, args.head_dim, args.window, args.docs
        if seq <= args.dense_max:
            cases["causal (full SDPA)"] = attention_case(seq, h, d, None, 0, "causal")
            cases["window dense"] = attention_case(seq, h, d, w, 0, "dense")
            cases[f"window+{n}docs dense"] = attention_case(seq, h, d, w, n, "dense")
            cases[f"{n}docs dense"] = attention_case(seq, h, d, None, n, "dense")
        for path in fast:
            cases[f"window {path}"] = attention_case(seq, h, d, w, 0, path)
            cases[f"window+{n}docs {path}"] = attention_case(seq, h, d, w, n, path)
            docs_path = path if cuda else "documents"  # CPU: each document on its own
            cases[f"{n}docs {docs_path}"] = attention_case(seq, h, d, None, n, docs_path)
        if cuda:
            cases[f"{n}docs varlen"] = attention_case(seq, h, d, None, n, "varlen")
        medians[seq] = measure(cases, args.warmups, args.repeats)
        for name, seconds in medians[seq].items():
            print(json.dumps({"seq_len": seq, "case": name, "median_s": round(seconds, 4)}))
    first, last = args.seqs[0], args.seqs[-1]
    for path in fast:
        window_row, docs_row = f"window {path}", f"window+{args.docs}docs {path}"
        summary = {
            f"{window_row} growth {first}->{last}": medians[last][window_row]
            / medians[first][window_row],
            f"{docs_row} / {window_row} at {last}": medians[last][docs_row]
            / medians[last][window_row],
        }
        for seq in args.seqs:
            if "window dense" in medians[seq]:
                summary[f"window dense / {window_row} at {seq}"] = (
                    medians[seq]["window dense"] / medians[seq][window_row]
                )
        print(json.dumps({k: round(v, 3) for k, v in summary.items()}))
    if args.train_step:
        steps = {
            "tiny T=256 B=4 causal": train_step_case(256, 4, None, None),
            "tiny T=1024 B=1 causal": train_step_case(1024, 1, None, None),
            "tiny T=1024 B=1 window=256 auto": train_step_case(1024, 1, 256, None),
            "tiny T=1024 B=1 window=256 dense": train_step_case(1024, 1, 256, "dense"),
            # 4x the sequence and the tokens of the row above, both well past the window.
            "tiny T=4096 B=1 window=256 auto": train_step_case(4096, 1, 256, None),
            # The same two with `train.loss_chunk_tokens: 1024` (no (tokens, vocab) logits).
            "tiny T=1024 B=1 window=256 auto chunked loss": train_step_case(
                1024, 1, 256, None, 1024
            ),
            "tiny T=4096 B=1 window=256 auto chunked loss": train_step_case(
                4096, 1, 256, None, 1024
            ),
        }
        step_medians = measure(steps, args.warmups, args.repeats)
        for name, seconds in step_medians.items():
            print(json.dumps({"train_step": name, "median_s": round(seconds, 4)}))
        growth = (
            step_medians["tiny T=4096 B=1 window=256 auto"]
            / step_medians["tiny T=1024 B=1 window=256 auto"]
        )
        chunked = (
            step_medians["tiny T=4096 B=1 window=256 auto chunked loss"]
            / step_medians["tiny T=1024 B=1 window=256 auto chunked loss"]
        )
        print(
            json.dumps(
                {
                    "window step growth T=1024->4096 (4x tokens)": round(growth, 3),
                    "the same with the chunked loss": round(chunked, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
