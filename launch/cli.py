"""The `scaletrain` command line. User mistakes print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

import yaml

EXIT_USAGE = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from data_pipeline.errors import DataError
    from launch.environment import LaunchError
    from model.config import ModelConfigError
    from trainer.checkpointing.checkpoint import CheckpointError
    from trainer.config_io import ConfigError
    from trainer.health import TrainingHealthError

    return (
        ConfigError,
        DataError,
        CheckpointError,
        ModelConfigError,
        LaunchError,
        TrainingHealthError,
    )


def _setup_logging(is_main: bool = True) -> None:
    from launch.logging_setup import configure_logging

    configure_logging(is_main)


# ---------------------------------------------------------------------------- train
def describe_plan(
    config_path: str, overrides: list[str], world_size: int | None = None, stage: str = "pretrain"
) -> str:
    """The `--dry-run` report: resolved config, sizes, FLOPs, memory and token budget.

    `world_size` defaults to the config's `parallel.planned_world_size` (written by `plan`),
    else 1. Runs the same preflight checks as `train` and imports no DeepSpeed."""
    from data_pipeline.tokenizer import Tokenizer
    from launch.preflight import load_config, preflight
    from model.flops import flops_per_token, param_counts
    from trainer.config_io import ConfigError, split_global_batch
    from trainer.deepspeed_config import build_deepspeed_config
    from trainer.expert_parallel import check_expert_parallel
    from trainer.planning.memory import model_state_memory
    from trainer.sequence_parallel import check_sequence_parallel

    config = load_config(config_path, overrides, stage)
    preflight(config)
    planned = ""
    if world_size is None:
        world_size = config.parallel.planned_world_size or 1
        planned = " from parallel.planned_world_size" if config.parallel.planned_world_size else ""
    if world_size < 1:
        raise ConfigError(f"--world-size: must be >= 1, got {world_size}")
    if config.model.vocab_size is None:
        config.model.vocab_size = (
            Tokenizer.load(config.tokenizer.path).vocab_size
            if config.tokenizer.path
            else config.tokenizer.vocab_size
        )
    sp = config.parallel.sequence_parallel
    problem = check_sequence_parallel(sp, config.model, config.data.seq_len, world_size)
    if problem:
        raise ConfigError(problem)
    micro, accumulation_steps = split_global_batch(
        config.global_batch_seqs,
        config.data.seq_len,
        world_size // sp,  # the ranks of a sequence-parallel group share their sequences
        config.train.micro_batch_size,
        config.train.max_micro_batch_size,
    )
    problem = check_expert_parallel(
        config.parallel.expert_parallel, config.model.n_experts, world_size
    )
    if problem:
        raise ConfigError(problem)
    precision = (
        config.resolved_precision(cuda=False)
        if config.parallel.precision == "auto"
        else config.parallel.precision
    )
    counts = param_counts(config.model)
    fpt = flops_per_token(config.model, config.data.seq_len)
    tokens = config.train.max_steps * config.train.global_batch_tokens
    lines = ["# resolved config", config.to_yaml().rstrip(), "", "# plan"]
    lines.append(
        f"parameters: total {counts.total:,}  active {counts.active:,}  non-embedding {counts.non_embedding:,}"
    )
    lines.append(f"flops_per_token: {fpt:.4g}  (6N + 12*L*H*Q*T at seq_len {config.data.seq_len})")
    lines.append(
        f"token_budget: {tokens:,} tokens = {config.train.max_steps:,} steps x {config.train.global_batch_tokens:,}"
        f"  ({tokens / counts.active:.2f} tokens/param; Chinchilla-optimal ~ {20 * counts.active:,})"
    )
    lines.append(f"training_flops: {fpt * tokens:.4g}")
    lines.append(
        f"memory per rank, model states ({precision}, world size {world_size}{planned}, offload {config.parallel.offload}):"
    )
    for zero in range(4):
        mem = model_state_memory(counts.total, zero, world_size, precision, config.parallel.offload)
        marker = " <- configured" if zero == config.parallel.zero_stage else ""
        lines.append(
            f"  zero-{zero}: {mem.device_bytes / 2**30:8.3f} GiB device "
            f"(params {mem.params_bytes / 2**30:.3f}, grads {mem.grads_bytes / 2**30:.3f}, "
            f"optimizer {mem.optimizer_bytes / 2**30:.3f}) + {mem.host_bytes / 2**30:.3f} GiB host{marker}"
        )
    lora = config.sections.get("lora")
    if lora is not None:  # fine-tuning stages: what trains, and its optimizer state
        from model.lora import adam_state_bytes, lora_parameter_counts

        total, trainable = lora_parameter_counts(config.model, lora)
        fp32_master = precision != "fp32" or config.parallel.zero_stage >= 1
        what = f"lora rank {lora.rank} on {', '.join(lora.targets)}" if lora.rank else "full"
        lines.append(
            f"trainable ({what}): {trainable:,} of {total:,} parameters "
            f"({100 * trainable / total:.3g}%); AdamW state "
            f"{adam_state_bytes(trainable, fp32_master) / 2**30:.3f} GiB "
            f"(full fine-tuning: {adam_state_bytes(counts.total, fp32_master) / 2**30:.3f} GiB; "
            "all ranks together, ZeRO >= 1 shards it)"
        )
        if lora.enabled:
            from model import build_model
            from model.lora import apply_lora, trained_flops_per_token

            adapted = apply_lora(build_model(config.model, "meta"), lora)
            lora_fpt = trained_flops_per_token(adapted, config.model, config.data.seq_len)
            lines.append(
                f"flops_per_token with lora: {lora_fpt:.4g}  (4N + 6 x adapter parameters + "
                f"12*L*H*Q*T: the frozen base gets no weight gradients; {lora_fpt / fpt:.3f}x "
                "full fine-tuning)"
            )
    ds = build_deepspeed_config(
        config.parallel, config.train.grad_clip, micro, accumulation_steps, world_size, precision
    )
    lines += ["", f"# deepspeed config (world size {world_size})", json.dumps(ds, indent=2)]
    return "\n".join(lines)


def _before_train(args: argparse.Namespace) -> None:
    """What `train` checks before any setup or run-directory write (nothing for --dry-run,
    which checks the same in describe_plan): flags, the config, its inputs; then DeepSpeed's
    one-time op builds, announced."""
    from launch.preflight import load_config, preflight
    from trainer.config_io import ConfigError

    if args.dry_run:
        return
    if args.world_size is not None:
        raise ConfigError(
            "--world-size: only plans a --dry-run; a run's world size comes from its launcher "
            "(torchrun --nproc-per-node, mpirun -n, srun)"
        )
    config = load_config(args.config, args.set, getattr(args, "stage", "pretrain"))
    preflight(config)
    _setup_logging()
    from launch.logging_setup import build_deepspeed_ops

    build_deepspeed_ops(cpu_offload=config.parallel.offload == "cpu")


def cmd_train(args: argparse.Namespace) -> int:
    """`train` and every post-training stage (`sft`, `dpo`, `rm`, `distill`): one loop."""
    _before_train(args)
    stage = getattr(args, "stage", "pretrain")
    if args.dry_run:
        print(describe_plan(args.config, args.set, args.world_size, stage))
        return 0
    import torch

    from launch.cpu_allocator import keep_large_allocations
    from launch.environment import detect_environment
    from launch.preflight import load_config
    from trainer.distributed import destroy
    from trainer.hooks import fault_injection_hooks
    from trainer.monitors import fine_tuning_monitors
    from trainer.trainer import Trainer

    config = load_config(args.config, args.set, stage)
    env = detect_environment()
    _setup_logging(env.is_main)
    if not torch.cuda.is_available():
        keep_large_allocations()  # large step tensors reused, not page-faulted in every step
    hooks = fault_injection_hooks(args.fail_at_step, args.stall_at_step, args.inject)
    hooks += fine_tuning_monitors(config)  # forgetting / diversity when a `monitor` section exists
    if stage in ("sft", "dpo"):  # the end-of-run chat turn (sft.sample_chat)
        from trainer.sft import ChatSample

        hooks.append(ChatSample())
    trainer = Trainer(config, env, stage=stage, hooks=hooks)
    trainer.setup()
    trainer.fit()  # the end-of-run sample is a hook (trainer.hooks.EndOfRunSample)
    destroy()
    return 0


# ---------------------------------------------------------------------------- other commands
def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from data_pipeline.config import SourceConfig
    from data_pipeline.sources import SkipCounter, iter_documents
    from data_pipeline.tokenizer import train_tokenizer

    skips = SkipCounter(strict=False)
    source = SourceConfig(path=args.input, text_field=args.text_field)
    tokenizer = train_tokenizer(
        iter_documents(source, "train", skips), args.vocab_size, args.model_type, args.max_sentences
    )
    path = tokenizer.save(args.out)
    skipped = f", skipped {skips.total()} records {dict(skips.counts)}" if skips.total() else ""
    print(
        f"wrote {path} ({tokenizer.vocab_size} pieces, bos={tokenizer.bos_id} eos={tokenizer.eos_id} pad={tokenizer.pad_id}{skipped})"
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.chat is not None:  # the checkpoint's chat template, stopping at the end of turn
        from launch.chat_cli import cmd_generate_chat

        return cmd_generate_chat(args)
    from model.generation import generate
    from trainer.inference import load_checkpoint_model

    loaded = load_checkpoint_model(args.checkpoint)
    prompt_ids = loaded.tokenizer.encode(args.prompt)
    if not prompt_ids:
        print("scaletrain: error: --prompt encodes to no tokens", file=sys.stderr)
        return EXIT_USAGE
    ids = generate(
        loaded.model,
        prompt_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop_ids=loaded.tokenizer.stop_ids,
        seed=args.seed,
    )
    print(args.prompt + loaded.tokenizer.decode(ids))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from trainer.inference import evaluate_source, load_checkpoint_model, perplexity

    loaded = load_checkpoint_model(args.checkpoint)
    loss, tokens = evaluate_source(loaded, args.data, args.split, args.max_sequences)
    print(
        json.dumps(
            {
                "checkpoint": str(loaded.folder),
                "data": args.data,
                "eval_loss": loss,
                "eval_ppl": perplexity(loss),
                "tokens": tokens,
            }
        )
    )
    return 0


def cmd_launch_slurm(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from launch.preflight import load_config
    from launch.slurm import SlurmJob, activation_lines, sbatch_script
    from trainer.config_io import ConfigError, split_global_batch

    config = load_config(args.config, args.set)  # fail now, not on the cluster
    world_size = args.nodes * args.gpus_per_node
    try:
        split_global_batch(
            config.global_batch_seqs,
            config.data.seq_len,
            world_size,
            config.train.micro_batch_size,
            config.train.max_micro_batch_size,
        )
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({args.nodes} nodes x {args.gpus_per_node} GPUs)") from None
    run_dir = Path(config.run.dir)
    workdir = os.getcwd()  # the job resolves the config and run.dir as they resolve here
    try:
        job = SlurmJob(
            config=args.config,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            job_name=args.job_name or config.run.name or Path(args.config).stem,
            time=args.time,
            partition=args.partition,
            account=args.account,
            cpus_per_task=args.cpus_per_task,
            port=args.port,
            max_restarts=args.max_restarts,
            overrides=tuple(args.set),
            workdir=workdir,
            log_dir=str(run_dir),
            activate=activation_lines(),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out = Path(args.out) if args.out else run_dir / f"{job.job_name}.sbatch"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(sbatch_script(job))
    print(
        f"wrote {out} (job {job.job_name}: {args.nodes} nodes x {args.gpus_per_node} GPUs; "
        f"output in {run_dir}/); submit with `sbatch {out}`"
    )
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaletrain",
        description="Distributed LLM training: pretraining, fine-tuning, preference optimisation, merging.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from launch import chat_cli

    stages = {
        "train": ("pretrain", "pretrain a model from a YAML config"),
        "sft": ("sft", "supervised fine-tuning on chat/instruction data (model.init_from)"),
        "dpo": ("dpo", "direct preference optimisation and its family (model.init_from)"),
        "rm": ("rm", "train a reward model on preference pairs (model.init_from)"),
        "distill": ("distill", "train a student on a frozen teacher's distributions"),
    }
    for command, (stage, help_text) in stages.items():
        sub = commands.add_parser(command, help=help_text)
        sub.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set train.lr=3e-4 (repeatable)",
        )
        sub.add_argument(
            "--dry-run",
            action="store_true",
            help="print the resolved config, sizes, FLOPs, memory and token budget; do not train",
        )
        sub.add_argument(
            "--world-size",
            type=int,
            default=None,
            help="with --dry-run: the number of ranks to plan memory and batches for "
            "(default: parallel.planned_world_size, else 1)",
        )
        sub.add_argument("--fail-at-step", type=int, default=None, help=argparse.SUPPRESS)
        sub.add_argument("--stall-at-step", type=int, default=None, help=argparse.SUPPRESS)
        sub.add_argument("--inject", default=None, help=argparse.SUPPRESS)
        sub.set_defaults(func=cmd_train, stage=stage)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools")
    tokenizer_commands = tokenizer.add_subparsers(
        dest="tokenizer_command", required=True, metavar="ACTION"
    )
    tok_train = tokenizer_commands.add_parser("train", help="train a sentencepiece BPE tokenizer")
    tok_train.add_argument(
        "--input", required=True, help="file, glob, folder, hf:NAME or builtin:stdlib"
    )
    tok_train.add_argument("--vocab-size", type=int, required=True)
    tok_train.add_argument("--out", required=True, help="output folder (gets tokenizer.model)")
    tok_train.add_argument(
        "--text-field", default="text", help="JSON/parquet field holding the text"
    )
    tok_train.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    tok_train.add_argument("--max-sentences", type=int, default=300_000)
    tok_train.set_defaults(func=cmd_tokenizer_train, light=True)

    gen = commands.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument(
        "checkpoint", help="checkpoint folder, or a run dir (uses its newest checkpoint)"
    )
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="plain text to continue")
    what.add_argument(
        "--chat",
        metavar="TEXT",
        help="a user message: rendered with the checkpoint's chat template, answered until "
        "the end of the assistant turn (only the answer is printed)",
    )
    chat_cli.add_sampling_arguments(gen)
    gen.set_defaults(func=cmd_generate)
    chat_cli.register(commands)

    ev = commands.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", required=True, help="file, glob, folder, hf:NAME or builtin:stdlib")
    ev.add_argument("--split", default="validation", choices=["train", "validation"])
    ev.add_argument("--max-sequences", type=int, default=64)
    ev.set_defaults(func=cmd_eval)

    launch = commands.add_parser("launch", help="write launcher scripts for clusters")
    launchers = launch.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    slurm = launchers.add_parser("slurm", help="write an sbatch script that runs srun torchrun")
    slurm.add_argument("config")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True)
    slurm.add_argument("--out", default=None, help="script path (default: RUN_DIR/JOB_NAME.sbatch)")
    slurm.add_argument(
        "--job-name", default=None, help="default: run.name, else the config file's stem"
    )
    slurm.add_argument("--time", default="24:00:00")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--cpus-per-task", type=int, default=16)
    slurm.add_argument(
        "--port", type=int, default=29500, help="c10d rendezvous port on the head node"
    )
    slurm.add_argument(
        "--max-restarts", type=int, default=3, help="torchrun restarts after a failure"
    )
    slurm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    slurm.set_defaults(func=cmd_launch_slurm)

    from launch import hf_cli

    hf_cli.register(commands)

    from launch import data_cli

    data_cli.register(commands)

    from launch import plan_cli

    plan_cli.register(commands)

    from launch import merge_cli

    merge_cli.register(commands)

    from launch import score_cli

    score_cli.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        _setup_logging()
        if not (getattr(args, "light", False) or getattr(args, "dry_run", False)):
            # Before anything imports DeepSpeed (--dry-run, plan and tokenizer never do).
            from launch.logging_setup import choose_accelerator

            choose_accelerator()
        return func(args)
    except _user_errors() as exc:
        print(f"scaletrain: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except yaml.YAMLError as exc:
        print(f"scaletrain: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
