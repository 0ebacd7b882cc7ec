"""`scaletrain plan`: compute-optimal model, tokens and config from a budget; `plan sweep`."""

from __future__ import annotations

import argparse
import json

# The GPUs trainer.planning.hardware.PEAK_BF16_FLOPS knows, named here so that
# `scaletrain --help` need not import torch; tests/test_cli_ux.py checks that the two agree.
GPU_NAMES = ("H200", "H100", "A100", "L40S", "A10G", "V100", "MI300X")


def _plan_text(plan_json: dict, out: str | None) -> str:
    """Human-readable summary of a plan's JSON."""
    p = plan_json
    m = p["model"]
    mem = p["memory_gb"]
    lines = [
        f"budget: {p['flops']:.3g} FLOPs   rule: {p['rule']}   loss fit: {p['loss_fit']['name']}",
        f"target (rule): N = {p['target_params']:.4g} params, D = {p['target_tokens']:.4g} tokens",
        f"model: {p['params']:,} params ({p['active_params']:,} active), "
        f"dim {m['dim']}, layers {m['n_layers']}, heads {m['n_heads']} (kv {m['n_kv_heads']}), "
        f"ffn {m['ffn_hidden_dim']}, vocab {m['vocab_size']}"
        + (f", MoE {m['moe_experts']}:{m['moe_top_k']}" if m["moe_experts"] else ""),
        f"tokens: {p['tokens']:,} ({p['tokens_per_param']:.1f} per active param), "
        f"C = 6 N D = {6 * p['active_params'] * p['tokens']:.4g}",
        f"predicted loss: {p['predicted_loss']:.4f} nats/token",
        f"batch: {p['global_batch_tokens']:,} tokens ({p['global_batch_tokens'] // p['seq_len']} x "
        f"{p['seq_len']}), lr {p['lr']:.3g}, warmup {p['warmup_steps']}, steps {p['steps']:,}",
        f"  source: {p['batch_lr_source']}",
    ]
    if p["gpu"]:
        lines.append(
            f"time: {p['gpu_hours']:,.1f} GPU-hours = {p['wall_clock_hours']:,.1f} h on "
            f"{p['gpus']} x {p['gpu']} at MFU {p['mfu']:.0%}"
        )
    lines.append(
        f"memory per GPU (bf16 Adam, {p['gpus']} GPUs, micro-batch {p['micro_batch_size']}):"
        f" activations {mem['activations']:.2f} GiB, {mem['activations_checkpointed']:.2f} GiB"
        " with checkpointing"
    )
    for stage, states in mem["model_states_by_zero_stage"].items():
        fit = mem["fits_by_zero_stage"][stage]
        verdict = (
            ""
            if fit["checkpointing"] is None
            else f"  fits {p['gpu']} ({mem['gpu_memory']:.0f} GiB): "
            f"{'yes' if fit['no_checkpointing'] else 'yes with checkpointing' if fit['checkpointing'] else 'no'}"
        )
        chosen = " <- planned" if int(stage) == p["zero_stage"] else ""
        lines.append(f"  zero-{stage}: model states {states:.2f} GiB{verdict}{chosen}")
    lines += [f"note: {note}" for note in p["notes"]]
    if out:
        lines.append(f"wrote {out} (check it with: scaletrain train {out} --dry-run)")
    return "\n".join(lines)


def _record_planned_setup(path: str, gpus: int) -> None:
    """Write into the planned config what its memory figures assume: bf16 and the planned
    number of GPUs (which `--dry-run` then uses as its world size), keeping the header."""
    from itertools import takewhile
    from pathlib import Path

    from trainer.config import load_job_config

    config = load_job_config(path)
    config.parallel.precision = "bf16"
    config.parallel.planned_world_size = gpus
    lines = Path(path).read_text().splitlines()
    header = "".join(f"{line}\n" for line in takewhile(lambda line: line.startswith("#"), lines))
    Path(path).write_text(header + config.to_yaml())


def cmd_plan(args: argparse.Namespace) -> int:
    from trainer.config_io import ConfigError
    from trainer.planning.planning import PlanRequest, make_plan, parse_moe, write_plan_config
    from trainer.planning.scaling_laws import parse_loss_fit

    if args.flops is None and args.gpus is None:
        raise ConfigError("plan: give --flops F, or --gpus N --hours H --gpu NAME")
    if args.flops is not None and args.hours is not None:
        raise ConfigError("plan: --flops and --hours both set the budget; give one")
    request = PlanRequest(
        flops=args.flops,
        gpus=args.gpus,
        hours=args.hours,
        gpu=args.gpu,
        mfu=args.mfu,
        rule=args.rule,
        custom_fit=parse_loss_fit(args.fit) if args.fit else None,
        tokens_per_param=args.tokens_per_param,
        moe=parse_moe(args.moe) if args.moe else None,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        tie_embeddings=args.tie_embeddings,
        micro_batch_size=args.micro_batch_size,
        zero_stage=args.zero_stage,
    )
    plan = make_plan(request)
    if args.out:
        write_plan_config(plan, args.out, args.run_dir)
        _record_planned_setup(args.out, plan.gpus)
    result = plan.to_json()
    if args.json:
        print(json.dumps(result))
    else:
        print(_plan_text(result, args.out))
    return 0


def _parse_budgets(text: str) -> list[float]:
    from trainer.config_io import ConfigError

    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise ConfigError(f"--budgets: expected comma-separated FLOPs, got {text!r}") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    from trainer.planning.sweep import SweepRequest, run_sweep

    report = run_sweep(
        SweepRequest(
            budgets=_parse_budgets(args.budgets),
            models_per_budget=args.models_per_budget,
            out_dir=args.out,
            seq_len=args.seq_len,
            vocab_size=args.vocab_size,
            bootstrap=args.bootstrap,
            seed=args.seed,
        )
    )
    print(report)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `plan` (and `plan sweep`) to the scaletrain command line."""
    plan = subparsers.add_parser(
        "plan",
        help="compute-optimal model size, tokens, batch, memory and a ready config",
        description="From --flops F, or --gpus N --hours H --gpu NAME, plan a compute-optimal "
        "run. `scaletrain plan sweep --help` fits your own scaling law.",
    )
    plan.add_argument("--flops", type=float, help="training compute budget C in FLOPs")
    plan.add_argument("--gpus", type=int, help="number of GPUs (also the ZeRO world size)")
    plan.add_argument("--hours", type=float, help="wall-clock hours on --gpus GPUs")
    plan.add_argument(
        "--gpu",
        type=str.upper,
        help=f"GPU model for time and memory ({', '.join(GPU_NAMES)})",
    )
    plan.add_argument(
        "--mfu", type=float, default=0.40, help="model-FLOPs utilisation (default 0.40)"
    )
    plan.add_argument(
        "--rule",
        default="chinchilla",
        choices=["chinchilla", "hoffmann2022", "epoch2024", "custom"],
        help="chinchilla: Hoffmann et al. 2022 approach 1 (Table 3); hoffmann2022 / epoch2024: "
        "minimise that parametric fit at C = 6ND; custom: minimise --fit",
    )
    plan.add_argument(
        "--fit", help="your own fit, 'E=1.8,A=482,B=2085,alpha=0.35,beta=0.37' (implies custom)"
    )
    plan.add_argument(
        "--tokens-per-param",
        type=float,
        help="over-train at this D/N (e.g. 100) instead of the compute optimum",
    )
    plan.add_argument("--moe", metavar="EXPERTS:TOPK", help="plan a mixture of experts, e.g. 8:2")
    plan.add_argument("--vocab-size", type=int, default=32000)
    plan.add_argument("--seq-len", type=int, default=2048)
    plan.add_argument("--tie-embeddings", action="store_true")
    plan.add_argument("--micro-batch-size", type=int, default=1, help="sequences per GPU step")
    plan.add_argument(
        "--zero-stage", type=int, choices=[0, 1, 2, 3], help="default: lowest stage that fits"
    )
    plan.add_argument("--out", metavar="CONFIG", help="write a ready YAML config here")
    plan.add_argument("--run-dir", default="runs/planned", help="run.dir of the --out config")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=cmd_plan, light=True)

    actions = plan.add_subparsers(dest="plan_command", metavar="ACTION")
    sweep = actions.add_parser(
        "sweep",
        help="IsoFLOP sweep of small models, fit L(N, D), plot the curves",
        description="Train small models at a few FLOP budgets (CPU is fine for tiny ones), fit "
        "L(N, D) = E + A/N^alpha + B/D^beta by Huber loss on logs, and draw the IsoFLOP curves.",
    )
    sweep.add_argument("--budgets", default="2e10,6e10,2e11", help="comma-separated FLOPs")
    sweep.add_argument("--models-per-budget", type=int, default=5)
    sweep.add_argument("--seq-len", type=int, default=64)
    sweep.add_argument("--vocab-size", type=int, default=256, help="byte tokens: must be 256")
    sweep.add_argument("--bootstrap", type=int, default=100)
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--out", default="docs/scaling", help="folder for results and the PNG")
    sweep.set_defaults(func=cmd_sweep, light=False)  # it may train through DeepSpeed
