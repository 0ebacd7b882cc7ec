"""SFT side by side with TRL's `SFTTrainer`: tokens/s and the first losses, in one process.

The same network, tokenizer and chat template for both: `--init-from` (our checkpoint or run
dir) is loaded, the chatml tokens are added to its tokenizer (two embedding rows at the mean row,
as `scaletrain sft` does) and the result is written once as an HF folder (`save_model_as_hf` +
the tokenizer files `scaletrain export` writes); ours fine-tunes `hf:FOLDER` (`chat.template:
auto`, the folder's own chatml, whose `{% generation %}` block holds the assistant content and
its <|im_end|>) and TRL loads the same folder with `AutoModelForCausalLM` / `AutoTokenizer`.
The conversations are the builtin:stdlib-instruct train split, those of at most `--seq-len`
tokens, written to one jsonl file that both read; TRL gets them in the order our loader draws
them (our seeded epoch-0 order), so step k of each side trains on the same conversations.

Settings, like for like (the padded comparison):
- ours: `scaletrain sft`'s Trainer, lora.rank 0, `sft.packing: false` (one conversation per
  row, padded to the micro-batch's longest), `sft.train_on: assistant`, ZeRO-0, fp32, AdamW
  (betas 0.9/0.95, eps 1e-8, weight decay 0, the per-parameter CPU kernel our optimizer picks),
  constant lr, no warmup, grad clip 1.0, `train.micro_batch_size` rows per micro-batch and
  `--rows` rows per optimizer step. The loss: summed over the step's assistant tokens, divided
  by their count over the step.
- TRL 1.16: `SFTConfig(assistant_only_loss=True, packing=False, max_length=seq_len,
  per_device_train_batch_size=micro, gradient_accumulation_steps=rows/micro,
  train_sampling_strategy="sequential", learning_rate, lr_scheduler_type="constant",
  warmup_steps=0, weight_decay=0, adam_beta2=0.95, max_grad_norm=1.0, use_cpu=True,
  bf16=False, gradient_checkpointing=False, logging_steps=1)`: TRL's defaults would be bf16
  autocast and activation recomputation, which are neither the same precision nor the same
  work. Everything else is its defaults (its optimizer `adamw_torch_fused`, its fused LM head
  (on CPU it scores every position, in chunks), right padding to the micro-batch's longest). Its
  loss is the same objective: summed over the step's labelled tokens and divided by
  `num_items_in_batch`, their count over the accumulated micro-batches.
- `--lora R`: both sides train LoRA adapters of rank R (alpha 2R, no dropout) on q/k/v/o, the
  base frozen: ours `lora.rank R`, TRL through `peft_config=peft.LoraConfig(...)`. Both start
  with B = 0, so the first losses still compare; later steps do not (each side draws its own A).
- `--packed` adds a second phase with each side's packing: ours `sft.packing: true` (best-fit
  rows of seq_len, document masking); TRL `packing=True` (its default strategy `bfd`, which
  makes it padding-free: one flattened row per micro-batch with position_ids). The rows per
  step are then packed rows, so the two sides no longer see the same conversations per step;
  the tokens/s are still real tokens of the same data.

Interleaving: each side runs its own loop (ours `Trainer.fit` on the main thread, TRL's
`trainer.train()` on a second thread) and hands the other a baton at the end of every
optimizer step (our hook's `after_step`, a TRL callback's `on_step_end`), so only one computes
at a time and the steps alternate: machine noise hits both alike. A step's time is from the
moment its side gets the baton to the moment it hands it back: its whole loop (data, forward,
backward, clip, optimizer, logging). Tokens are real (non-padding) tokens of the step, each
side's own count (ours: `StepResult.tokens`, the batches' non-padding positions; TRL: the
attention-mask sum, `include_num_input_tokens_seen="non_padding"`); both totals are printed
and are equal when padded (the same conversations). Reported: the median
tokens/s of each over the steps after the first `--warmup`, their ratio ours/TRL and the median
of the per-step ratios (step k of each ran back to back), the first step losses of both and
their difference (padded: every step's, as both see the same conversations).

Run:  /tmp/trlvenv/bin/python -m bench.trl_sft --init-from runs/tiny [--steps 40 --rows 16
      --micro 8 --seq-len 256 --packed --lora 16]
TRL is a bench-only install (not a dependency of scaletrain): `pip install trl`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "builtin:stdlib-instruct"


# ---------------------------------------------------------------------------- shared inputs
def shared_folder(init_from: str, out: Path) -> Path:
    """Our checkpoint with the chatml tokens added, as an HF folder both sides load."""
    from data_pipeline.chat import load_chat_template, resize_token_embeddings
    from data_pipeline.config import ChatConfig
    from model.hf.weights import save_model_as_hf
    from trainer.hf_checkpoint import write_tokenizer_files
    from trainer.inference import load_checkpoint_model

    loaded = load_checkpoint_model(init_from)
    template, tokenizer, _ = load_chat_template(ChatConfig("chatml"), loaded.tokenizer, None)
    resize_token_embeddings(loaded.model, tokenizer.vocab_size)
    save_model_as_hf(loaded.model, out, dtype=torch.float32)
    write_tokenizer_files(tokenizer, out, loaded.model.config.max_seq_len, template.source)
    return out


def write_conversations(folder: Path, seq_len: int, path: Path) -> int:
    """The train split's conversations that fit `seq_len` under the folder's template, as jsonl
    {"messages": [...]}; returns how many."""
    from data_pipeline.chat import load_chat_template
    from data_pipeline.config import ChatConfig, SourceConfig
    from data_pipeline.conversations import RecordError, record_messages
    from data_pipeline.sources import SkipCounter, iter_record_outcomes
    from data_pipeline.tokenizer import Tokenizer

    template, _, _ = load_chat_template(ChatConfig("auto"), Tokenizer.load(folder), folder)
    kept = 0
    with path.open("w") as handle:
        for _, record in iter_record_outcomes(
            SourceConfig(path=SOURCE), "train", SkipCounter(False)
        ):
            try:
                messages = record_messages(record) if record is not None else None
            except RecordError:
                continue
            if messages and len(template.tokenize(messages, "assistant")) <= seq_len:
                handle.write(json.dumps({"messages": messages}) + "\n")
                kept += 1
    return kept


# ---------------------------------------------------------------------------- interleaving
class Baton:
    """Whose turn it is ("ours" or "trl"); the other side waits. `failed` wakes everyone."""

    def __init__(self) -> None:
        self.turn = "ours"
        self.failed: BaseException | None = None
        self.condition = threading.Condition()

    def wait_for(self, side: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.turn == side or self.failed is not None)
            if self.failed is not None and side == "ours":
                raise RuntimeError("the TRL side failed") from self.failed

    def give(self, side: str) -> None:
        with self.condition:
            self.turn = side
            self.condition.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.condition:
            self.failed = error
            self.condition.notify_all()


class StepClock:
    """A side's step times: from getting the baton to handing it back."""

    def __init__(self, baton: Baton, side: str, other: str) -> None:
        self.baton, self.side, self.other = baton, side, other
        self.started = 0.0
        self.step_s: list[float] = []

    def begin(self) -> None:
        self.started = time.perf_counter()

    def end_and_pass(self) -> None:
        self.step_s.append(time.perf_counter() - self.started)
        self.baton.give(self.other)
        self.baton.wait_for(self.side)
        self.started = time.perf_counter()


# ---------------------------------------------------------------------------- ours
def ours_config(
    folder: Path, data: Path, run_dir: Path, args: argparse.Namespace, packing: bool
) -> dict[str, Any]:
    """`scaletrain sft`'s config for the bench (see the module docstring)."""
    return {
        "run": {"dir": str(run_dir), "seed": args.seed},
        "model": {"init_from": f"hf:{folder}"},
        "data": {"seq_len": args.seq_len, "train": [{"path": str(data), "name": "chats"}]},
        "train": {
            "max_steps": args.steps,
            "global_batch_tokens": args.rows * args.seq_len,
            "micro_batch_size": args.micro,
            "lr": args.lr,
            "warmup_steps": 0,
            "schedule": "constant",
            "weight_decay": 0.0,
            "beta1": 0.9,
            "beta2": 0.95,
            "eps": 1e-8,
            "grad_clip": 1.0,
            "eval_every": 0,
            "log_every": 1,
            "progress": False,
            "sample_prompt": None,
        },
        "parallel": {"zero_stage": 0, "precision": "fp32"},
        "checkpoint": {"every": 0, "keep": 1, "resume": "none"},
        "chat": {"template": "auto"},
        "sft": {
            "train_on": "assistant",
            "packing": packing,
            "truncation": "drop",
            "sample_chat": None,
        },
        "lora": _ours_lora(getattr(args, "lora", 0)),
    }


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _ours_lora(rank: int) -> dict[str, Any]:
    """`--lora R`: rank R on the attention projections, alpha 2R, no dropout (0: full)."""
    if not rank:
        return {"rank": 0}
    return {"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0, "targets": LORA_TARGETS}


def build_ours(raw: dict[str, Any], hooks: list[Any]) -> Any:
    """`scaletrain sft`'s Trainer on `raw`, set up (model, engine, data), not yet trained."""
    from launch.environment import detect_environment
    from trainer.config import job_config_from_dict
    from trainer.stages import get_stage
    from trainer.trainer import Trainer

    get_stage("sft")  # registers the stage's config sections
    trainer = Trainer(job_config_from_dict(raw, stage="sft"), detect_environment(), "sft", hooks)
    trainer.setup()
    return trainer


def make_ours_hook(clock: StepClock, losses: list[float], tokens: list[int]) -> Any:
    from trainer.hooks import Hook

    class Interleave(Hook):
        """Records our step's loss and tokens, then lets TRL run one step."""

        name = "bench_interleave"

        def on_train_start(self, trainer: Any) -> None:
            clock.begin()

        def after_step(self, trainer: Any, result: Any) -> bool:
            losses.append(float(result.metrics["loss"]))
            tokens.append(int(result.tokens))
            clock.end_and_pass()
            return False

    return Interleave()


# ---------------------------------------------------------------------------- TRL
def import_trl() -> Any:
    try:
        import trl
    except ImportError:
        sys.exit("bench.trl_sft: TRL is not installed (a bench-only install: pip install trl)")
    return trl


def build_trl(
    folder: Path,
    records: list[dict[str, Any]],
    out: Path,
    args: argparse.Namespace,
    packing: bool,
    callback: Any,
) -> Any:
    """TRL's SFTTrainer on the same folder and conversations (see the module docstring)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trl = import_trl()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = trl.SFTConfig(
        output_dir=str(out),
        assistant_only_loss=True,
        packing=packing,
        max_length=args.seq_len,
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.rows // args.micro,
        train_sampling_strategy="sequential",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL's default is bf16 autocast where supported: the same precision is fp32
        gradient_checkpointing=False,  # TRL's default is on; ours recomputes nothing either
        seed=args.seed,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    dataset = datasets.Dataset.from_list(records)
    peft_config = None
    if args.lora:  # the same adapters through peft (TRL's own LoRA path)
        import peft

        peft_config = peft.LoraConfig(
            r=args.lora,
            lora_alpha=2 * args.lora,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            bias="none",
            task_type="CAUSAL_LM",
        )
    return trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback],
        peft_config=peft_config,
    )


def make_trl_callback(clock: StepClock, losses: list[float], tokens: list[int]) -> Any:
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        """Records TRL's step loss (on_log) and tokens, then lets ours run one step."""

        seen = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tokens.append(int(state.num_input_tokens_seen) - self.seen)
            self.seen = int(state.num_input_tokens_seen)
            clock.end_and_pass()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return Interleave()


# ---------------------------------------------------------------------------- one phase
def first_batch_check(ours: Any, theirs: Any) -> dict[str, Any]:
    """Our first micro-batch against TRL's: the same real tokens, the same trained labels."""
    loader = ours.loader.loader
    ours_batch = loader.micro_batches(0, 0)[0]
    theirs_batch = next(iter(theirs.get_train_dataloader()))
    ids, mask = theirs_batch["input_ids"], theirs_batch["attention_mask"].bool()
    same_ids = ids.shape == ours_batch.input_ids.shape and bool(
        torch.equal(ids[mask], ours_batch.input_ids[~ours_batch.pad_mask])
    )
    # Our labels are aligned (label t is the target of input t); TRL's are shifted in the loss.
    theirs_targets = theirs_batch["labels"][:, 1:]
    same_labels = bool(torch.equal(theirs_targets, ours_batch.labels[:, :-1]))
    return {
        "first_micro_batch_same_ids": same_ids,
        "first_micro_batch_same_labels": same_labels,
        "first_micro_batch_trained_tokens": int((theirs_targets != -100).sum()),
    }


def run_phase(
    folder: Path, data: Path, scratch: Path, args: argparse.Namespace, packing: bool
) -> dict[str, Any]:
    """Ours and TRL, steps interleaved; the phase's figures."""
    records = [json.loads(line) for line in data.read_text().splitlines()]
    baton = Baton()
    ours_clock, trl_clock = StepClock(baton, "ours", "trl"), StepClock(baton, "trl", "ours")
    ours_losses: list[float] = []
    ours_tokens: list[int] = []
    trl_losses: list[float] = []
    trl_tokens: list[int] = []
    name = "packed" if packing else "padded"
    ours = build_ours(
        ours_config(folder, data, scratch / f"ours-{name}", args, packing),
        [make_ours_hook(ours_clock, ours_losses, ours_tokens)],
    )
    # TRL reads the conversations in our epoch-0 order (ours: one conversation per row, padded).
    if not packing:
        order = [row[0] for row in ours.loader.loader.rows(0)]
        line_of = [int(c.where.rsplit(":", 1)[1]) - 1 for c in ours.loader.dataset.conversations]
        records = [records[line_of[i]] for i in order]
    theirs = build_trl(
        folder,
        records,
        scratch / f"trl-{name}",
        args,
        packing,
        make_trl_callback(trl_clock, trl_losses, trl_tokens),
    )
    check = {} if packing else first_batch_check(ours, theirs)
    threads = torch.get_num_threads()

    def trl_side() -> None:
        torch.set_num_threads(threads)
        try:
            baton.wait_for("trl")
            theirs.train()
        except BaseException as error:
            baton.fail(error)
            raise
        baton.give("ours")

    worker = threading.Thread(target=trl_side, name="trl")
    worker.start()
    ours.fit()
    baton.give("trl")  # TRL finishes its loop (its last step is done)
    worker.join()
    if baton.failed is not None:
        raise RuntimeError("the TRL side failed") from baton.failed
    skip = args.warmup
    ours_speeds = [t / s for t, s in zip(ours_tokens, ours_clock.step_s, strict=True)][skip:]
    trl_speeds = [t / s for t, s in zip(trl_tokens, trl_clock.step_s, strict=True)][skip:]
    ours_speed, trl_speed = statistics.median(ours_speeds), statistics.median(trl_speeds)
    return {
        "phase": name,
        "steps": args.steps,
        "rows_per_step": args.rows,
        "micro_batch_rows": args.micro,
        "seq_len": args.seq_len,
        "ours_tokens_per_s": ours_speed,
        "trl_tokens_per_s": trl_speed,
        "ours_over_trl": ours_speed / trl_speed,
        # Step k of ours and of TRL run back to back: the median of their ratios is the least
        # sensitive to load that changes over the run.
        "ours_over_trl_per_step_median": statistics.median(
            o / t for o, t in zip(ours_speeds, trl_speeds, strict=True)
        ),
        "ours_tokens": sum(ours_tokens),
        "trl_tokens": sum(trl_tokens),
        "ours_step_s": ours_clock.step_s,
        "trl_step_s": trl_clock.step_s,
        "ours_losses": ours_losses,
        "trl_losses": trl_losses,
        "first_loss_abs_diff": abs(ours_losses[0] - trl_losses[0]),
        **check,
        # The same conversations per step only when padded: then every step's loss compares
        # (with LoRA only the first: the two sides draw their adapters' A matrices apart).
        **(
            {}
            if packing or args.lora
            else {
                "max_loss_rel_diff": max(
                    abs(a - b) / abs(b) for a, b in zip(ours_losses, trl_losses, strict=True)
                )
            }
        ),
    }


def main(argv: list[str] | None = None, phases: Callable[..., Any] = run_phase) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--init-from", required=True, help="our checkpoint or run dir")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of tokens/s")
    parser.add_argument("--rows", type=int, default=16, help="rows (sequences) per step")
    parser.add_argument("--micro", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--packed", action="store_true", help="also each side's packing")
    parser.add_argument(
        "--lora", type=int, default=0, help="LoRA rank on q/k/v/o for both sides (0: full)"
    )
    args = parser.parse_args(argv)
    if args.rows % args.micro:
        parser.error("--rows must be a multiple of --micro")
    import_trl()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as name:
        scratch = Path(name)
        from trainer.checkpointing.checkpoint import CheckpointError

        try:
            folder = shared_folder(args.init_from, scratch / "hf")
        except CheckpointError as exc:
            sys.exit(f"bench.trl_sft: {exc}")
        data = scratch / "conversations.jsonl"
        kept = write_conversations(folder, args.seq_len, data)
        print(json.dumps({"conversations": kept, "torch_threads": torch.get_num_threads()}))
        results = {}
        for packing in (False, True) if args.packed else (False,):
            results[packing] = phases(folder, data, scratch, args, packing)
            print(json.dumps(results[packing]), flush=True)
        if args.packed:  # each side's default: ours packs, TRL pads (two phases: less exact)
            defaults = results[True]["ours_tokens_per_s"] / results[False]["trl_tokens_per_s"]
            print(json.dumps({"ours_packed_over_trl_padded_across_phases": defaults}))


if __name__ == "__main__":
    main()
