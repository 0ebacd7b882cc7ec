"""The training loop every stage runs: fetch, count, forward/backward, guard, step, log, hooks.

What a stage trains (its objective and typed batches) comes from `trainer.stages`; side jobs
(preemption, spike rollback, the end-of-run sample, test faults) are hooks (`trainer.hooks`);
saving and loading named stateful pieces is `trainer.checkpointing`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

from data_pipeline.batch import Batch
from data_pipeline.sharded import gather_from_ranks, sum_counts
from data_pipeline.sources import SkipCounter
from model import build_model
from trainer.checkpointing import checkpoint as ckpt
from trainer.checkpointing import deepspeed_internals as ds_internals
from trainer.checkpointing.manager import CheckpointManager
from trainer.config import JobConfig, write_config
from trainer.config_io import ConfigError
from trainer.deepspeed_config import build_deepspeed_config
from trainer.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    deepspeed,
    init_distributed,
    set_collective_timeout,
)
from trainer.expert_parallel import check_expert_parallel, update_router_biases
from trainer.health import LossGuard
from trainer.hooks import EndOfRunSample, Hook, Preemption, SpikeRollback, stop_agreed
from trainer.metrics import MetricsLogger, reduce_step_outputs
from trainer.objectives.base import StepOutput
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallelize import parallelize
from trainer.planning.hardware import current_device_peak_flops
from trainer.sequence_parallel import check_sequence_parallel, slice_batch
from trainer.setup import batch_split, load_weights, prepare_tokenizer, seed_everything
from trainer.stages import Stage, StageContext, get_stage

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """One optimizer step, reduced over micro-batches and ranks (the same on every rank)."""

    metrics: dict[str, Any]  # the objective's metrics, `loss` among them
    lr: float
    grad_norm: float
    skipped: bool  # the update was not applied (non-finite or spike)
    spike: bool
    tokens: int  # non-padding tokens of the step, all ranks
    flops: float


def resolve_config(config: JobConfig, precision: str, vocab_size: int) -> JobConfig:
    """A copy of `config` with what setup decided filled in (the caller's stays as given)."""
    resolved = copy.deepcopy(config)
    resolved.parallel.precision = precision  # type: ignore[assignment]
    resolved.model.vocab_size = vocab_size
    return resolved


class Trainer:
    """Trains one stage through the DeepSpeed engine; one instance per process."""

    def __init__(
        self,
        config: JobConfig,
        env: DistEnv,
        stage: str | Stage = "pretrain",
        hooks: list[Hook] | None = None,
    ) -> None:
        self.config = config
        self.env = env
        self.stage = get_stage(stage) if isinstance(stage, str) else stage
        self.run_dir = Path(config.run.dir)
        self.checkpoint_root = self.run_dir / "checkpoints"
        self.step = 0
        self.tokens_seen = 0
        self.preempted = False
        self.skips = SkipCounter(strict=config.data.strict)
        train = config.train
        self.guard = LossGuard(
            train.spike_sigma,
            train.spike_window,
            train.spike_min_history,
            train.max_nonfinite_in_a_row,
            train.spike_max_in_a_row,
        )
        self.preemption = Preemption()
        self.rollback = SpikeRollback(train.spike_rollback, train.max_rollbacks)
        self.hooks: list[Hook] = [self.preemption, self.rollback, EndOfRunSample(), *(hooks or [])]
        self._eval_sets: dict[str, list[Batch]] | None = None
        self._summary_step = -1  # the step of the last skipped-records line
        self.metrics: MetricsLogger | None = None  # rank 0's sinks, open while fit runs

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        """Build everything in the fixed order: ranks, tokenizer, model, engine, data, resume."""
        env = self.env
        self._check_sequence_parallel()
        self.micro_batch_size, self.accumulation_steps = batch_split(self.config, env.world_size)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
        precision = self.config.resolved_precision(cuda)
        if precision == "fp16" and not cuda:
            raise ConfigError(
                "parallel.precision: fp16 needs a CUDA device (DeepSpeed's CPU accelerator has no fp16); "
                "use bf16 or fp32"
            )
        init_distributed(
            env, self.config.parallel.backend, timeout_s=self.config.parallel.init_timeout_s
        )
        seed_everything(self.config.run.seed)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_temporaries(self.checkpoint_root)
        barrier()

        tokenizer = prepare_tokenizer(self.config, self.run_dir, env)
        ctx = StageContext(
            self.config,
            env,
            tokenizer,
            self.skips,
            self.micro_batch_size,
            run_dir=self.run_dir,
            device=self.device,
        )
        if self.stage.prepare is not None:  # e.g. a chat template and its added tokens
            self.stage.prepare(ctx)
        self.tokenizer = ctx.tokenizer
        # The network is built at the size of its source; a stage may grow the vocabulary.
        vocab_size = self.config.model.vocab_size or self.tokenizer.vocab_size
        config = resolve_config(self.config, precision, vocab_size)
        self.precision = precision

        problem = check_expert_parallel(
            config.parallel.expert_parallel, config.model.n_experts, env.world_size
        )
        if problem:
            raise ConfigError(problem)
        model = build_model(config.model, self.device, seed=config.run.seed)
        if config.model.init_from:
            load_weights(model, config.model.init_from)
        ctx.config = config
        self.module = (
            model if self.stage.prepare_model is None else self.stage.prepare_model(ctx, model)
        )
        self.model = model  # the transformer (inside self.module when a stage wraps it)
        if model.config.vocab_size != vocab_size:  # rows added for new tokens
            config = resolve_config(config, precision, model.config.require_vocab())
        if config.model.require_vocab() < self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} pieces"
            )
        self.config = ctx.config = config
        if env.is_main:
            write_config(config, self.run_dir / "config.yaml")
        parallelize(model, config.parallel)

        self.objective = self.stage.build_objective(ctx)
        self.checkpoints = CheckpointManager(self)
        # Before the engine exists: a checkpoint of another layout loads through a converted copy.
        self.checkpoints.prepare_resume()
        self.ds_config = build_deepspeed_config(
            config.parallel,
            config.train.grad_clip,
            self.micro_batch_size,
            self.accumulation_steps,
            env.world_size,
            precision,
            load_universal=self.checkpoints.loads_universal_on_resume,
        )
        optimizer = build_optimizer(
            self.module, config.train, offload=config.parallel.offload == "cpu"
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module,
            optimizer=optimizer,
            lr_scheduler=build_scheduler(optimizer, config.train),
            config=self.ds_config,
            dist_init_required=False,
        )
        self.checkpoints.attach_engine()
        self.loader = self.stage.build_loader(ctx)
        self.eval_context = ctx
        self.peak_flops = current_device_peak_flops()
        self.checkpoints.resume()

    def _check_sequence_parallel(self) -> None:
        config = self.config
        sp = config.parallel.sequence_parallel
        problem = check_sequence_parallel(
            sp, config.model, config.data.seq_len, self.env.world_size
        )
        if problem is None and sp > 1 and not self.stage.sequence_parallel:
            problem = (
                f"parallel.sequence_parallel: the {self.stage.name} stage does not support "
                "sequence parallelism (set it to 1)"
            )
        if problem:
            raise ConfigError(problem)

    def local_batch(self, batch: Batch) -> Batch:
        """`batch` on this rank's device; with sequence parallelism, this rank's slice of it."""
        sp = self.config.parallel.sequence_parallel
        return slice_batch(
            batch.to(self.device),
            self.env.rank % sp,
            sp,
            self.config.model.reset_positions_per_document,
        )

    # ---------------------------------------------------------------- the step
    def train_step(self, micro_batches: list[Batch]) -> StepResult:
        """Forward, backward, guard, clip and step over one global batch.

        Each micro-batch's loss is its unit sum over the step's global unit count (counted
        before the first forward), so the update does not depend on how the step is split.
        The guard judges the global step loss after the last forward, before its backward.
        """
        engine, objective = self.engine, self.objective
        micro_batches = [self.local_batch(b) for b in micro_batches]
        (global_units,) = all_reduce_sum(
            [float(sum(objective.count_units(b) for b in micro_batches))], self.device
        )
        lr = self.optimizer.param_groups[0]["lr"]
        skipped_before, dropped, verdict = ds_internals.skipped_steps(engine), False, None
        grad_norm: float | None = None
        outputs: list[StepOutput] = []
        for index, batch in enumerate(micro_batches):
            output = objective.train_step(engine, batch, max(int(global_units), 1))
            for hook in self.hooks:
                hook.on_micro_batch(self, output)
            outputs.append(output)
            loss = output.loss
            if index == len(micro_batches) - 1:  # the whole step's loss is known: judge it
                totals = reduce_step_outputs(outputs, self.device, self.env.world_size)
                verdict = self.guard.classify(totals.metrics["loss"])
                if verdict is not None:
                    loss = loss * float("nan")  # poisoned gradients make every rank skip
            # DeepSpeed averages gradients over ranks: undo that, the loss is a global sum.
            engine.backward(loss * self.env.world_size, scale_wrt_gas=False)
            if engine.is_gradient_accumulation_boundary():
                grad_norm = self._grad_norm_before_step()
                if grad_norm is not None and not math.isfinite(grad_norm):
                    dropped = self._drop_gradients()
            ds_internals.engine_step(engine, skip=dropped)
        update_router_biases(engine.module)  # aux-loss-free balancing: once per step
        grad_norm = ds_internals.global_grad_norm(engine, grad_norm)
        skipped = dropped or ds_internals.skipped_steps(engine) > skipped_before
        spike = skipped and verdict == "spike"
        self.guard.after_step(float(totals.metrics["loss"]), skipped, verdict or "nonfinite")
        return StepResult(
            totals.metrics,
            lr,
            grad_norm if grad_norm is not None else float("nan"),
            skipped,
            spike,
            totals.tokens,
            totals.flops,
        )

    def _drop_gradients(self) -> bool:
        """ZeRO-0 has no overflow check of its own: with the gradients gone, AdamW skips."""
        for param in self.module.parameters():
            param.grad = None
        return True

    def _grad_norm_before_step(self) -> float | None:
        """At ZeRO-0 in fp32 DeepSpeed reports no norm; there, grads are whole and local."""
        if self.config.parallel.zero_stage != 0 or self.precision != "fp32":
            return None
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads).item()) if grads else 0.0

    # ---------------------------------------------------------------- the loop
    def fit(self) -> None:
        """Train until train.max_steps, evaluating, checkpointing and calling hooks on schedule."""
        metrics = MetricsLogger(self.run_dir, resume_step=self.step) if self.env.is_main else None
        self.metrics = metrics
        try:
            self._fit(metrics)
        finally:
            self.metrics = None
            if metrics is not None:
                metrics.close()

    def log_metrics(self, record: dict[str, Any], prefix: str) -> None:
        """A line from outside the loop's own (a monitor's): metrics.jsonl and TensorBoard
        under `prefix/`, on rank 0, while `fit` runs."""
        if self.metrics is not None:
            self.metrics.log(record, prefix=prefix)

    def _fit(self, metrics: MetricsLogger | None) -> None:
        config, env = self.config, self.env
        progress = tqdm(
            total=config.train.max_steps,
            initial=self.step,
            desc=self.stage.name,
            unit="step",
            disable=not (env.is_main and config.train.progress),
            dynamic_ncols=True,
            mininterval=0.5,
        )
        self.engine.train()
        first_step = self.step
        for hook in self.hooks:
            hook.on_train_start(self)
        try:
            if self.step == 0 and config.train.eval_every > 0:
                self._evaluate_and_log(metrics, progress)
            while self.step < config.train.max_steps:
                started = time.perf_counter()
                micro_batches = self.loader.next_step()
                data_s = time.perf_counter() - started
                result = self.train_step(micro_batches)
                elapsed = time.perf_counter() - started
                self.step += 1
                self.tokens_seen += result.tokens
                if self.step == first_step + 1:
                    set_collective_timeout(config.parallel.step_timeout_s)
                record = self._step_record(result, elapsed, data_s)
                if metrics is not None and self.step % config.train.log_every == 0:
                    metrics.log(record)
                progress.set_postfix(
                    loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}"
                )
                progress.update(1)
                if any([hook.after_step(self, result) for hook in self.hooks]):
                    progress.n = self.step  # rewound (a rollback): no eval or save here
                    progress.refresh()
                else:
                    if self._on_schedule(config.train.eval_every):
                        self._evaluate_and_log(metrics, progress)
                    if self._on_schedule(config.checkpoint.every):
                        self.checkpoints.save()
                    for hook in self.hooks:
                        hook.after_checkpoint_schedule(self)
                if stop_agreed(self.hooks, self.device):
                    self.preempted = True
                    break
            if self.preempted:
                logger.warning(
                    "signal %s: saving at step %d and exiting", self.preemption.signal, self.step
                )
            elif config.train.eval_every > 0 and self.step % config.train.eval_every != 0:
                self._evaluate_and_log(metrics, progress)
            if self._summary_step != self.step:  # the run's last word on skipped records
                self._print_skipped_summary(progress)
            self.checkpoints.wait()
            if not self._saved(self.step):
                self.checkpoints.save()
                self.checkpoints.wait()
        finally:
            self.checkpoints.finish_in_flight()
            self.preemption.restore()
            self.loader.close()
            progress.close()
        for hook in self.hooks:
            hook.on_train_end(self)  # the metrics sinks still open: monitors log here

    def _on_schedule(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _saved(self, step: int) -> bool:
        return (self.checkpoint_root / ckpt.step_dir_name(step) / ckpt.MANIFEST).is_file()

    def _step_record(self, result: StepResult, elapsed: float, data_s: float) -> dict[str, Any]:
        """The metrics.jsonl line of a step: the objective's metrics, then the loop's."""
        tokens_by_source, skipped_by_reason = self.data_counts()
        return {
            "step": self.step,
            **result.metrics,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens": self.tokens_seen,
            "tokens_per_s": result.tokens / elapsed,
            "mfu": self._mfu(result.flops / elapsed),
            "mem_gb": self._memory_gb(),
            "data_wait_fraction": data_s / elapsed,
            "skipped_update": result.skipped,
            "skipped_nonfinite": self.guard.skipped_nonfinite,
            "skipped_spikes": self.guard.skipped_spikes,
            "skipped_records": sum(skipped_by_reason.values()),
            "skipped_steps": ds_internals.skipped_steps(self.engine),
            "skipped_by_reason": skipped_by_reason,
            **self.rollback.metrics(),
            "tokens_by_source": tokens_by_source,
        }

    def _mfu(self, flops_per_s: float) -> float | None:
        if self.peak_flops is None:
            return None
        return flops_per_s / (self.peak_flops * self.env.world_size)

    def _memory_gb(self) -> float:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 1e9
        return float(psutil.Process().memory_info().rss) / 1e9

    def data_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Tokens by source and skipped records by reason, over the world (a collective when
        each rank reads only its own data)."""
        counts = (self.loader.tokens_by_source(), dict(self.skips.counts))
        if not self.loader.counts_are_local:
            return counts
        # The ranks of a sequence-parallel group read the same data: count it once.
        parts = gather_from_ranks(counts)[:: self.config.parallel.sequence_parallel]
        return sum_counts([p[0] for p in parts]), sum_counts([p[1] for p in parts])

    def _print_skipped_summary(self, progress: tqdm) -> None:
        """One console line on rank 0: skipped records by reason so far (every rank calls:
        a collective when counts are local)."""
        _, by_reason = self.data_counts()
        self._summary_step = self.step
        if not self.env.is_main:
            return
        detail = ", ".join(f"{reason} {n}" for reason, n in sorted(by_reason.items()))
        total = sum(by_reason.values())
        progress.write(
            f"step {self.step}: skipped records: {total} ({detail})"
            if total
            else f"step {self.step}: skipped records: none"
        )

    def roll_back_to_latest_checkpoint(self) -> Path | None:
        """Reload the latest complete checkpoint's model, optimizer and guard window, keeping
        the data position and every counter (all ranks must call); None if there is none."""
        return self.checkpoints.roll_back()

    # ---------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Per validation split, each of the objective's eval metrics summed over all ranks
        (numerator / denominator: token-weighted for `eval_loss`)."""
        if self._eval_sets is None:
            self._eval_sets = self.stage.build_eval_sets(self.eval_context)
        self.engine.eval()
        results = {}
        for split, batches in self._eval_sets.items():
            sums: dict[str, list[float]] = {}
            for batch in batches:
                for name, (num, den) in self.objective.eval_step(
                    self.engine, self.local_batch(batch)
                ).items():
                    total = sums.setdefault(name, [0.0, 0.0])
                    total[0] += num
                    total[1] += den
            names = sorted(sums) or ["eval_loss"]
            flat = [v for name in names for v in sums.get(name, [0.0, 0.0])]
            reduced = all_reduce_sum(flat, self.device)
            results[split] = {
                name: reduced[2 * i] / reduced[2 * i + 1] for i, name in enumerate(names)
            }
        self.engine.train()
        return results

    def _evaluate_and_log(self, metrics: MetricsLogger | None, progress: tqdm) -> None:
        for split, values in self.evaluate().items():
            loss = values["eval_loss"]
            record = {
                "step": self.step,
                "eval_loss": loss,
                "eval_ppl": math.exp(min(loss, 50.0)),
                "split": split,
                **{k: v for k, v in values.items() if k != "eval_loss"},
            }
            if metrics is not None:
                metrics.log(record, prefix=f"eval/{split}")
            if self.env.is_main:
                progress.write(
                    f"step {self.step}: eval {split} loss {loss:.4f} ppl {record['eval_ppl']:.2f}"
                )
        self._print_skipped_summary(progress)
