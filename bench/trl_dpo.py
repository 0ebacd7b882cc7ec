"""Our DPO against TRL's DPOTrainer, in one process, step by step interleaved.

Both sides get the same model (ours exported with `save_model_as_hf`, loaded by
`AutoModelForCausalLM`: identical weights), the same pairs as the same token ids, served in
the same order (our loader's; TRL with `train_sampling_strategy="sequential"`), the same
pairs per step (one micro-batch), beta, loss `sigmoid`, AdamW (lr, betas, eps, no weight
decay, constant lr, clipping at 1.0), fp32, on the same threads.

TRL's tokenisation is bypassed: its `_prepare_dataset` returns our token ids as the
`prompt_ids` / `chosen_ids` / `rejected_ids` columns its collator reads, so both sides score
exactly the same tokens. Everything after that (collation, the reference, the pre-pass, the
loss, the optimizer loop) is TRL's own. TRL's defaults that change the arithmetic are set to
match ours: `bf16=False` (fp32), `gradient_checkpointing=False` (ours recomputes nothing;
`--trl-gradient-checkpointing` keeps TRL's default, True), `max_length=None` (our pairs fit
`data.seq_len`).

Two pairings, each one TRL `train()` whose `on_step_end` callback runs one step of each of our
two modes (fresh Trainers per pairing), so every TRL step sits between ours:
  A: TRL defaults (a live reference copy)   vs ours-cache and ours-live
  B: TRL `precompute_ref_log_probs=True`     vs ours-cache and ours-live
A TRL step is timed from the end of our steps in the previous callback to its `on_step_end`
(batch fetch, forward/backward, clip, optimizer step and the previous step's logging); ours as
in bench/dpo.py (`loader.next_step()` + `Trainer.train_step()`). The first step of each is
left out of the medians. Ratios are given from the median pairs/s and per step (the median
over steps of TRL's time / ours on the same batch). One torch thread by default (see
bench/dpo.py).

Step-0 checks: TRL's first logged loss and ours' first `dpo_loss` (both ln 2 with a reference
equal to the policy); the chosen / rejected log-prob sums of the first batch, per pair, from
TRL's `compute_ref_log_probs` on its collated batch and from our model on ours; with the
pre-pass, TRL's cached reference log-probs against our cache, pair by pair.

Run (TRL is a bench-only install, not a scaletrain dependency):
  /tmp/trlvenv/bin/python -m bench.trl_dpo [--init-from RUN_DIR] [--steps 30 --pairs-per-step 4]
Prints one JSON line per pairing and side, the checks, and a summary line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import torch

from bench.dpo import Runner, build_base, dpo_config, write_pairs
from trainer.dpo import PairLoader

LN2 = math.log(2)


def import_trl() -> Any:
    try:
        import trl
    except ImportError:
        raise SystemExit(
            "bench/trl_dpo.py needs TRL, a bench-only install (pip install trl in a separate "
            "venv); scaletrain does not depend on it"
        ) from None
    return trl


def export_for_hf(runner: Runner, folder: Path) -> Path:
    """Our starting policy as an HF folder (weights, config, tokenizer with the chat template)."""
    from model.hf.weights import save_model_as_hf
    from trainer.dpo import TEMPLATE
    from trainer.hf_checkpoint import write_tokenizer_files

    trainer = runner.trainer
    folder.mkdir(parents=True)
    save_model_as_hf(trainer.model, folder, dtype=torch.float32)
    template = trainer.eval_context.extras[TEMPLATE]
    write_tokenizer_files(
        trainer.tokenizer, folder, trainer.config.model.max_seq_len, template.source
    )
    return folder


def served_pairs(runner: Runner, steps: int) -> list[Any]:
    """The pairs our loader serves in steps [0, steps), in order (TokenizedPair)."""
    loader = cast(PairLoader, runner.trainer.loader)
    return [pair for step in range(steps) for pair in loader.global_pairs(step)]


def trl_dataset(pairs: list[Any]) -> Any:
    """Our token ids in the columns TRL's preference collator reads."""
    from datasets import Dataset

    columns: dict[str, list[Any]] = {
        "prompt_ids": [],
        "chosen_ids": [],
        "rejected_ids": [],
        "example_id": [],
    }
    for pair in pairs:
        prompt = pair.chosen_ids[: pair.chosen_start]
        assert prompt == pair.rejected_ids[: pair.rejected_start], "pairs share their prompt"
        columns["prompt_ids"].append(prompt)
        columns["chosen_ids"].append(pair.chosen_ids[pair.chosen_start :])
        columns["rejected_ids"].append(pair.rejected_ids[pair.rejected_start :])
        columns["example_id"].append(pair.example_id)
    return Dataset.from_dict(columns)


def make_trl_trainer(
    trl: Any,
    hf_folder: Path,
    dataset: Any,
    out: Path,
    *,
    precompute: bool,
    args: argparse.Namespace,
    callback: Any,
) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    class PretokenisedDPOTrainer(trl.DPOTrainer):
        """TRL's DPOTrainer on a dataset already holding our token ids; times its pre-pass."""

        prepass_s: float | None = None

        def _prepare_dataset(self, dataset: Any, *_: Any, **__: Any) -> Any:
            return dataset

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            started = time.perf_counter()
            result = super()._precompute_ref_logps(dataset, name, batch_size)
            self.prepass_s = time.perf_counter() - started
            return result

    config = trl.DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.pairs_per_step,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=None,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=args.pairs_per_step,
        gradient_checkpointing=args.trl_gradient_checkpointing,
        bf16=False,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=1234,
        # The process state made at the start of main (one process), not a new one.
        accelerator_config={"use_configured_state": True},
    )
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    started = time.perf_counter()
    trainer = PretokenisedDPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.setup_s = time.perf_counter() - started
    # disable_tqdm makes the Trainer print every log line; ours writes none in the timed span.
    trainer.remove_callback(PrinterCallback)
    return trainer


def make_interleaver(ours: list[Runner]) -> Any:
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        """After each TRL optimizer step, one step of each of our runners (rotated order)."""

        def __init__(self) -> None:
            self.resumed = 0.0
            self.times: list[float] = []

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.resumed = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.times.append(time.perf_counter() - self.resumed)
            shift = len(self.times) % len(ours)
            for runner in ours[shift:] + ours[:shift]:
                runner.step()
            self.resumed = time.perf_counter()

    return Interleave()


def first_batch_logps(trl_trainer: Any, runner: Runner, pairs_per_step: int) -> dict[str, Any]:
    """Per-pair chosen/rejected log-prob sums of step 0's batch on both sides, and whether
    the two sides hold the same token ids."""
    from data_pipeline.preference import collate_pairs
    from trainer.dpo import _pad_id
    from trainer.reference_cache import batch_sequence_logps

    batch = next(iter(trl_trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = torch.cat(trl_trainer.compute_ref_log_probs(trl_trainer.model, batch)).cpu()
        pairs = cast(PairLoader, runner.trainer.loader).global_pairs(0)
        ours_batch = collate_pairs(pairs, _pad_id(runner.trainer.eval_context))
        ours = batch_sequence_logps(runner.trainer.model, ours_batch)[0].cpu()
    sequences = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    same_tokens = all(
        batch["input_ids"][row, : int(batch["attention_mask"][row].sum())].tolist() == ids
        for row, ids in enumerate(sequences)
    )
    return {
        "same_token_ids": same_tokens,
        "ours_logps": [round(float(x), 5) for x in ours],
        "trl_logps": [round(float(x), 5) for x in theirs],
        "max_abs_diff": float((ours.double() - theirs.double()).abs().max()),
    }


def cached_reference_diff(trl_trainer: Any, runner: Runner) -> dict[str, Any]:
    """TRL's precomputed reference log-probs against our cache, pair by pair."""
    from trainer.dpo import CACHED_LOGPS

    chosen, rejected = runner.trainer.eval_context.extras[CACHED_LOGPS]
    data = trl_trainer.train_dataset
    ids = torch.tensor(data["example_id"])
    theirs = torch.cat(
        [torch.tensor(data["ref_chosen_logps"]), torch.tensor(data["ref_rejected_logps"])]
    )
    ours = torch.cat([chosen[ids], rejected[ids]])
    return {"pairs": len(ids), "max_abs_diff": float((ours.double() - theirs.double()).abs().max())}


def pairing(
    trl: Any,
    name: str,
    precompute: bool,
    args: argparse.Namespace,
    init_from: Path,
    pairs_file: Path,
    scratch: Path,
) -> dict[str, Any]:
    """One TRL run with our two modes stepped in its callback; the figures of all three."""

    def ours_config(cache: bool) -> dict[str, Any]:
        return dpo_config(
            init_from,
            pairs_file,
            scratch / f"{name}-ours-{'cache' if cache else 'live'}",
            lora_rank=0,
            cache=cache,
            pairs_per_step=args.pairs_per_step,
            steps=args.steps,
            lr=args.lr,
            beta=args.beta,
        )

    ours = [Runner("ours-cache", ours_config(True)), Runner("ours-live", ours_config(False))]
    hf_folder = export_for_hf(ours[1], scratch / f"{name}-hf")
    pairs = served_pairs(ours[1], args.steps)
    interleave = make_interleaver(ours)
    trl_trainer = make_trl_trainer(
        trl,
        hf_folder,
        trl_dataset(pairs),
        scratch / f"{name}-trl",
        precompute=precompute,
        args=args,
        callback=interleave,
    )
    checks: dict[str, Any] = {
        "first_batch": first_batch_logps(trl_trainer, ours[1], args.pairs_per_step)
    }
    if precompute:
        checks["cached_reference"] = cached_reference_diff(trl_trainer, ours[0])
    checks["trl_setup"] = {
        "distributed_type": str(trl_trainer.accelerator.distributed_type),
        "threads": torch.get_num_threads(),
    }
    trl_trainer.train()
    checks["trl_setup"]["wrapped_model"] = type(trl_trainer.model_wrapped).__name__
    first_log = trl_trainer.state.log_history[0]
    trl_name = "trl-precompute" if precompute else "trl-live"
    trl_median = statistics.median(interleave.times[1:])
    rows = {
        trl_name: {
            "pairing": name,
            "side": trl_name,
            "steps": len(interleave.times),
            "median_step_s": trl_median,
            "pairs_per_s": args.pairs_per_step / trl_median,
            "prepass_s": trl_trainer.prepass_s,
            "setup_s": trl_trainer.setup_s,
            "first_loss": first_log["loss"],
            "first_loss_minus_ln2": first_log["loss"] - LN2,
            "first_logps_chosen": first_log.get("logps/chosen"),
            "first_logps_rejected": first_log.get("logps/rejected"),
        }
    }
    for runner in ours:
        summary = runner.summary(args.pairs_per_step)
        rows[runner.name] = {
            "pairing": name,
            "side": runner.name,
            "steps": summary["steps"],
            "median_step_s": summary["median_step_s"],
            "pairs_per_s": summary["pairs_per_s"],
            "prepass_s": summary["prepass_s"],
            "setup_s": summary["setup_s"],
            "first_loss": summary["first_dpo_loss"],
            "first_loss_minus_ln2": summary["first_loss_minus_ln2"],
            "first_logps_chosen": summary["first_logps_chosen"],
            "first_logps_rejected": (runner.first_metrics or {}).get("logps_rejected"),
        }
    paired = {
        f"{runner.name}_over_{trl_name}_per_step": statistics.median(
            theirs / mine
            for theirs, mine in zip(interleave.times[1:], runner.times[1:], strict=True)
        )
        for runner in ours
    }
    return {"rows": rows, "checks": checks, "paired": paired, "pairs_served": len(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--init-from", help="checkpoint or run dir (default: build one)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: torch's default; bench/dpo.py)"
    )
    parser.add_argument("--trl-gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    trl = import_trl()
    import transformers
    from accelerate import PartialState

    # Accelerate's process state first, from a clean environment: one process, no DDP. (Our
    # Trainers export RANK/LOCAL_RANK/WORLD_SIZE and start a 1-rank process group; built after
    # them, the state would be MULTI_CPU and TRL's model wrapped in DistributedDataParallel.)
    PartialState(cpu=not torch.cuda.is_available())

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        init_from = Path(args.init_from) if args.init_from else build_base(scratch / "base")
        pairs_file = write_pairs(scratch / "pairs.jsonl", args.steps * args.pairs_per_step)
        for name, precompute in (("A", False), ("B", True)):
            results[name] = pairing(trl, name, precompute, args, init_from, pairs_file, scratch)
            for row in results[name]["rows"].values():
                print(json.dumps(row), flush=True)
            print(json.dumps({"pairing": name, **results[name]["checks"]}), flush=True)
            print(json.dumps({"pairing": name, **results[name]["paired"]}), flush=True)
    a, b = results["A"]["rows"], results["B"]["rows"]
    speed = {
        f"{name}/{side}": row["pairs_per_s"]
        for name, result in results.items()
        for side, row in result["rows"].items()
    }
    summary = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "pairs_per_s": speed,
        "ours_cache_over_trl_defaults": a["ours-cache"]["pairs_per_s"]
        / a["trl-live"]["pairs_per_s"],
        "ours_live_over_trl_live": a["ours-live"]["pairs_per_s"] / a["trl-live"]["pairs_per_s"],
        "ours_cache_over_trl_precompute": b["ours-cache"]["pairs_per_s"]
        / b["trl-precompute"]["pairs_per_s"],
        "ours_live_over_trl_precompute": b["ours-live"]["pairs_per_s"]
        / b["trl-precompute"]["pairs_per_s"],
        "per_step": {**results["A"]["paired"], **results["B"]["paired"]},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
