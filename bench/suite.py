"""The one-command throughput suite: `make bench-gpu` (one GPU) or `python -m bench.suite --smoke`.

Rows (each one either measured or skipped with a one-line reason):
1. `train-*`: the 1B preset through `scaletrain train` itself (DeepSpeed ZeRO-0, bf16, one GPU,
   synthetic text tokenized on the fly), seq 2048 eager / `parallel.compile` / selective
   activation checkpointing (`selective_ops`), and seq 4096 eager: tokens/s, MFU, peak memory
   and data-wait fraction, read from the run's metrics.jsonl (median over the steps after the
   warm-up ones).
2. `transformers-*`: the same shape and micro-batch in `transformers`' LlamaForCausalLM (SDPA,
   fp32 weights under bf16 autocast, fused AdamW) driven by a plain torch loop; the row's
   `ratio_ours_over_theirs` divides row `train-seq*-eager` by it.
3. `moe-*`: the `moe-8x-1B-active` preset through `scaletrain train`; its MFU counts active
   FLOPs (the trainer's `mfu`), and the row says whether the grouped-GEMM expert path ran.
4. `attention-*`: the rows of `bench/attention.py` when that module exists and exposes
   `suite_rows(smoke: bool) -> list[dict]`, else one skipped row.

Writes `bench/results/<date>-<gpu>.json` and `<date>-<gpu>.md` (a table for
docs/BENCHMARKS.md). `--smoke` runs every row on CPU with tiny shapes and a few steps (fp32, no
MFU): it checks that the suite still works (`tests/test_bench_suite.py` runs it in `make test`),
its figures mean nothing. Without `--smoke` the suite needs CUDA with bf16 and checks free memory
first; it stops within `--budget-s` (480 s by default, for one H200), skipping the rows it has
no time left for.

On a GPU each training run is its own `scaletrain train` process (so that rows do not share GPU
memory) and stops right after its last measured step through the trainer's `--fail-at-step`
hook (exit status 17, no final checkpoint): a 1B run's checkpoint with optimizer state is
~20 GB, which would cost more time and disk than the measurement. `--smoke` runs what the
command runs (load the config, Trainer setup and fit) in-process and lets the tiny runs finish.

Carrying packages to a GPU machine without network: the device image has torch, accelerate,
sentencepiece, mpi4py and pyarrow but not deepspeed, datasets or transformers. Build the wheels
here (the list in bench/wheels.txt, without their torch dependency), carry `.whl/` with the
working tree, and the suite installs what is missing from it at start:

    python -m pip wheel --no-deps --no-build-isolation -r bench/wheels.txt -w .whl
    make bench-gpu          # = python -m bench.suite (installs from .whl/ when needed)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WHEELS_LIST = ROOT / "bench" / "wheels.txt"
#: Import names the suite needs beyond the device image, and the wheel folder it installs from.
NEEDED_MODULES = ("deepspeed", "datasets", "transformers", "tensorboard", "zstandard", "yaml")
FAIL_AT_EXIT = 17  # the trainer's --fail-at-step exit status: stopped where we asked
MIN_FREE_GPU_GB = 100.0  # the MoE row (3.5B parameters, ZeRO-0 bf16 + Adam) needs ~70 GB


@dataclass
class Shapes:
    """Everything that differs between a GPU run and the CPU smoke run."""

    dense_model: dict[str, Any]
    moe_model: dict[str, Any]
    seq_lens: tuple[int, ...]  # the first one gets every variant, the others eager only
    micro_batch: dict[int, int]  # sequences per step by seq_len
    moe_micro_batch: int  # the MoE row's (its model states alone are ~56 GB at 3.5B parameters)
    steps: int  # measured steps per run
    warmup_steps: int  # steps left out of the medians (allocator, compile, first batches)
    vocab_size: int  # the tokenizer's; the model keeps its preset vocabulary when larger
    precision: str
    corpus_documents: int
    extra: dict[str, Any] = field(default_factory=dict)


GPU = Shapes(
    dense_model={"preset": "1B"},
    moe_model={"preset": "moe-8x-1B-active"},
    seq_lens=(2048, 4096),
    micro_batch={2048: 8, 4096: 4},
    moe_micro_batch=4,
    steps=24,
    warmup_steps=6,
    vocab_size=8192,
    precision="bf16",
    corpus_documents=20000,
)
SMOKE = Shapes(
    dense_model={
        "preset": "tiny",
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "max_seq_len": 128,
        "vocab_size": 1024,
    },
    moe_model={
        "preset": "tiny-moe",
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "max_seq_len": 128,
        "n_experts": 4,
        "top_k": 2,
        "moe_ffn_hidden_dim": 64,
        "vocab_size": 1024,
    },
    seq_lens=(64, 128),
    micro_batch={64: 2, 128: 1},
    moe_micro_batch=2,
    steps=3,
    warmup_steps=1,
    vocab_size=320,
    precision="fp32",
    corpus_documents=300,
)


def log(message: str) -> None:
    print(f"bench.suite: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- setup
def install_missing_packages(wheel_dir: Path) -> None:
    """Install the wheels in `wheel_dir` when a needed module is missing (offline GPU machines)."""
    missing = [name for name in NEEDED_MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if not wheel_dir.is_dir():
        raise SystemExit(
            f"bench.suite: missing {', '.join(missing)} and no wheel folder {wheel_dir} "
            "(build it with: pip wheel --no-deps --no-build-isolation -r bench/wheels.txt -w .whl)"
        )
    log(f"installing {', '.join(missing)} from {wheel_dir}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--find-links",
            str(wheel_dir),
            "-r",
            str(WHEELS_LIST),
        ],
        check=True,
    )


def gpu_preconditions() -> str | None:
    """Why the GPU rows cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (run with --smoke for the CPU check of the suite itself)"
    if not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name()} has no bf16"
    free_bytes, _ = torch.cuda.mem_get_info()
    if free_bytes / 1e9 < MIN_FREE_GPU_GB:
        return f"only {free_bytes / 1e9:.0f} GB of GPU memory free, the suite needs {MIN_FREE_GPU_GB:.0f}"
    return None


def device_name(smoke: bool) -> str:
    import torch

    if not smoke and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def write_corpus(path: Path, documents: int) -> None:
    """Synthetic code-like text: throughput does not depend on what the words mean."""
    rng = random.Random(0)
    words = [f"{a}{b}" for a in ("get", "set", "load", "save", "run", "make") for b in "xyzuvw"]
    with path.open("w") as handle:
        for _ in range(documents):
            lines = [
                f"def {rng.choice(words)}({rng.choice(words)}, {rng.choice(words)}):\n"
                f"    return {rng.choice(words)} + {rng.randint(0, 999)}\n"
                for _ in range(rng.randint(4, 40))
            ]
            handle.write(json.dumps({"text": "".join(lines)}) + "\n")


def train_tokenizer(corpus: Path, out: Path, vocab_size: int, in_process: bool) -> None:
    """`scaletrain tokenizer train` on the corpus (in this process for the smoke run)."""
    args = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", str(vocab_size)]
    args += ["--out", str(out)]
    if in_process:
        from launch.cli import main as scaletrain

        status = scaletrain(args)
    else:
        result = run_cli(args, timeout_s=300)
        status = result.returncode
    if status != 0:
        raise SystemExit(f"bench.suite: scaletrain tokenizer train exited {status}")


def run_cli(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if "DS_ACCELERATOR" not in env:
        import torch

        env["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


# ---------------------------------------------------------------- rows
@dataclass
class Context:
    shapes: Shapes
    smoke: bool
    workdir: Path
    corpus: Path
    tokenizer: Path
    deadline: float  # time.monotonic() by which the suite must be done

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


def skipped(row: str, reason: str) -> dict[str, Any]:
    log(f"skipped {row}: {reason}")
    return {"row": row, "status": "skipped", "reason": reason}


def scaletrain_row(
    ctx: Context,
    row: str,
    model: dict[str, Any],
    seq_len: int,
    parallel: dict[str, Any],
    micro_batch: int | None = None,
) -> dict[str, Any]:
    """One `scaletrain train` run; the medians of its metrics.jsonl after the warm-up steps."""
    if ctx.time_left() < 30:
        return skipped(row, "out of the suite's time budget")
    shapes = ctx.shapes
    micro = micro_batch or shapes.micro_batch[seq_len]
    total_steps = shapes.warmup_steps + shapes.steps
    run_dir = ctx.workdir / row
    config: dict[str, Any] = {
        "run": {"dir": str(run_dir), "seed": 0},
        "model": {**model, "max_seq_len": max(seq_len, int(model.get("max_seq_len", 0)))},
        "tokenizer": {"path": str(ctx.tokenizer)},
        "data": {
            "seq_len": seq_len,
            "train": [{"path": str(ctx.corpus), "name": "synthetic"}],
            "validation": [{"path": str(ctx.corpus), "name": "synthetic"}],
        },
        "train": {
            "max_steps": total_steps + 1,  # never reached: --fail-at-step stops the run first
            "global_batch_tokens": micro * seq_len,
            "micro_batch_size": micro,
            "warmup_steps": 2,
            "eval_every": 0,
            "progress": False,
            "sample_prompt": None,
        },
        "parallel": {"zero_stage": 0, "precision": shapes.precision, **parallel},
        "checkpoint": {"every": 0},
    }
    config_path = ctx.workdir / f"{row}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.monotonic()
    if ctx.smoke:
        # What `scaletrain train` runs (config loading, Trainer setup and fit), in this process:
        # a fresh interpreter per row would cost more than the row. The command's own wrapper
        # is left out because it tears down the process group DeepSpeed caches for the next run.
        from launch.environment import detect_environment
        from trainer.config import load_job_config
        from trainer.trainer import Trainer

        config["train"]["max_steps"] = total_steps  # a tiny final checkpoint is cheap
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        trainer = Trainer(load_job_config(config_path), detect_environment())
        trainer.setup()
        # The compile row goes through apply_compile with dynamo switched off: inductor's CPU
        # compilation takes ~100 s, too long for `make test` (the GPU run compiles for real).
        import torch._dynamo

        with torch._dynamo.config.patch(disable=bool(parallel.get("compile"))):
            trainer.fit()
    else:
        try:
            result = run_cli(
                ["train", str(config_path), "--fail-at-step", str(total_steps)],
                timeout_s=max(10.0, ctx.time_left()),
            )
        except subprocess.TimeoutExpired:
            return skipped(row, "ran past the suite's time budget")
        if result.returncode not in (0, FAIL_AT_EXIT):
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            return {"row": row, "status": "failed", "reason": last[:300]}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = [x for x in lines if "loss" in x][shapes.warmup_steps :]
    if not measured:
        return {"row": row, "status": "failed", "reason": "no training step was logged"}

    def median(key: str) -> float | None:
        values = [x[key] for x in measured if x.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "row": row,
        "status": "ok",
        "seq_len": seq_len,
        "micro_batch": micro,
        "steps_measured": len(measured),
        "tokens_per_s": median("tokens_per_s"),
        "mfu": median("mfu"),
        "peak_mem_gb": max(x["mem_gb"] for x in measured),
        "data_wait_fraction": median("data_wait_fraction"),
        "final_loss": measured[-1]["loss"],
        "wall_s": round(time.monotonic() - started, 1),
        **{f"parallel.{k}": v for k, v in parallel.items()},
    }


def transformers_row(ctx: Context, row: str, seq_len: int) -> dict[str, Any]:
    """The dense shape in LlamaForCausalLM (SDPA), a plain loop: bf16 autocast, fused AdamW."""
    if ctx.time_left() < 30:
        return skipped(row, "out of the suite's time budget")
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.config import job_config_from_dict

    shape = job_config_from_dict(
        {"model": {**ctx.shapes.dense_model, "max_seq_len": seq_len}, "data": {"seq_len": seq_len}}
    ).model
    cuda = torch.cuda.is_available() and not ctx.smoke
    device = torch.device("cuda" if cuda else "cpu")
    vocab = shape.require_vocab()
    hf_config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.dim,
        intermediate_size=shape.ffn_dim,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_seq_len,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.norm_eps,
        tie_word_embeddings=shape.tie_embeddings,
        attn_implementation="sdpa",
    )
    with device:
        model = LlamaForCausalLM(hf_config)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=1e-4,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        **({"fused": True} if cuda else {"foreach": True}),
    )
    micro = ctx.shapes.micro_batch[seq_len]
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    times: list[float] = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(ctx.shapes.warmup_steps + ctx.shapes.steps):
        tokens = torch.randint(0, ctx.shapes.vocab_size, (micro, seq_len + 1), generator=generator)
        tokens = tokens.to(device)
        started = time.perf_counter()
        with autocast:
            logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= ctx.shapes.warmup_steps:
            times.append(time.perf_counter() - started)
    del model, optimizer
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    if cuda:
        torch.cuda.empty_cache()
    return {
        "row": row,
        "status": "ok",
        "seq_len": seq_len,
        "micro_batch": micro,
        "steps_measured": len(times),
        "tokens_per_s": micro * seq_len / statistics.median(times),
        "peak_mem_gb": peak,
        "final_loss": loss.item(),
    }


def moe_row(ctx: Context, seq_len: int) -> dict[str, Any]:
    import torch

    row = f"moe-seq{seq_len}-eager"
    result = scaletrain_row(
        ctx, row, ctx.shapes.moe_model, seq_len, {}, micro_batch=ctx.shapes.moe_micro_batch
    )
    on_gpu = torch.cuda.is_available() and not ctx.smoke
    # model/moe/experts.py: torch._grouped_mm runs for bf16 CUDA tensors when torch has it.
    result["grouped_mm"] = on_gpu and hasattr(torch, "_grouped_mm")
    result["mfu_counts"] = "active parameters (model.flops.flops_per_token)"
    return result


def attention_rows(ctx: Context) -> list[dict[str, Any]]:
    """bench/attention.py's own rows, when it exists (written separately)."""
    if importlib.util.find_spec("bench.attention") is None:
        return [skipped("attention", "bench/attention.py does not exist yet")]
    import bench.attention

    suite_rows: Callable[[bool], list[dict[str, Any]]] | None = getattr(
        bench.attention, "suite_rows", None
    )
    if suite_rows is None:
        return [skipped("attention", "bench/attention.py has no suite_rows(smoke) entry point")]
    try:
        rows = suite_rows(ctx.smoke)
    except Exception as exc:  # its failure must not take the other rows' figures with it
        return [{"row": "attention", "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}]
    return [
        {"status": "ok", **r, "row": f"attention-{r.get('row', i)}"} for i, r in enumerate(rows)
    ]


def config_accepts(key: str, value: str) -> bool:
    """Whether ParallelConfig's field `key` admits `value` (a Literal of modes)."""
    import typing

    from trainer.config import ParallelConfig

    return value in typing.get_args(typing.get_type_hints(ParallelConfig)[key])


def run_suite(smoke: bool, workdir: Path, budget_s: float) -> list[dict[str, Any]]:
    """Every row, in order, within `budget_s` seconds."""

    shapes = SMOKE if smoke else GPU
    deadline = time.monotonic() + budget_s
    corpus = workdir / "corpus.jsonl"
    write_corpus(corpus, shapes.corpus_documents)
    tokenizer = workdir / "tokenizer"
    train_tokenizer(corpus, tokenizer, shapes.vocab_size, in_process=smoke)
    ctx = Context(shapes, smoke, workdir, corpus, tokenizer, deadline)
    first, *others = shapes.seq_lens
    rows = [
        scaletrain_row(ctx, f"train-seq{first}-eager", shapes.dense_model, first, {}),
        transformers_row(ctx, f"transformers-seq{first}", first),
        scaletrain_row(
            ctx, f"train-seq{first}-compile", shapes.dense_model, first, {"compile": True}
        ),
        scaletrain_row(
            ctx,
            f"train-seq{first}-selective_ops",
            shapes.dense_model,
            first,
            {"activation_checkpointing": "selective_ops"},
        )
        if config_accepts("activation_checkpointing", "selective_ops")
        else skipped(
            f"train-seq{first}-selective_ops",
            "parallel.activation_checkpointing does not list selective_ops yet (trainer/config.py)",
        ),
    ]
    if smoke:
        rows[2]["reason"] = "smoke: blocks wrapped by torch.compile with dynamo disabled (eager)"
    for seq_len in others:
        rows.append(
            scaletrain_row(ctx, f"train-seq{seq_len}-eager", shapes.dense_model, seq_len, {})
        )
    rows.append(moe_row(ctx, first))
    rows += attention_rows(ctx)
    ours, theirs = rows[0], rows[1]
    if ours["status"] == theirs["status"] == "ok":
        theirs["ratio_ours_over_theirs"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    return rows


# ---------------------------------------------------------------- report
COLUMNS = (
    ("row", "row", "{}"),
    ("status", "status", "{}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("peak_mem_gb", "peak GB", "{:.1f}"),
    ("data_wait_fraction", "data wait", "{:.1%}"),
    ("ratio_ours_over_theirs", "ours/theirs", "{:.2f}x"),
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " | note |",
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for row in rows:
        cells = [
            fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in COLUMNS
        ]
        note = row.get("reason", "")
        if "grouped_mm" in row:
            note = f"grouped GEMM: {'yes' if row['grouped_mm'] else 'no'}; {note}".rstrip("; ")
        lines.append("| " + " | ".join([*cells, note]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="every row on CPU, tiny shapes")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    args = parser.parse_args(argv)

    install_missing_packages(args.wheels)
    if not args.smoke:
        reason = gpu_preconditions()
        if reason is not None:
            log(f"skipped every row: {reason}")
            return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as folder:
        rows = run_suite(args.smoke, Path(folder), args.budget_s)
    import torch

    device = device_name(args.smoke)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    name = f"{stamp:%Y-%m-%d}-{device.replace(' ', '_')}{'-smoke' if args.smoke else ''}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "date": stamp.isoformat(timespec="seconds"),
        "device": device,
        "smoke": args.smoke,
        "command": "python -m bench.suite" + (" --smoke" if args.smoke else ""),
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "wall_s": round(time.monotonic() - started, 1),
        "rows": rows,
    }
    (args.out_dir / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown_table(rows)
    (args.out_dir / f"{name}.md").write_text(
        f"{report['date']}, {device}, `{report['command']}`, {report['wall_s']} s\n\n{table}"
    )
    print(table, end="")
    log(f"wrote {args.out_dir / name}.json and .md in {report['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
