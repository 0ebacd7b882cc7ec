"""The Trainer: owns setup, the loop, evaluation, checkpointing and resume."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from data_pipeline.errors import DataError
from data_pipeline.packing import build_packed_sequences, document_segments
from data_pipeline.sharded import build_train_loader, gather_from_ranks, sum_counts
from data_pipeline.sources import SkipCounter
from data_pipeline.tokenizer import Tokenizer, train_tokenizer_on_sources
from model import build_model
from model.flops import flops_per_token
from model.transformer import Transformer
from trainer import async_checkpoint, reshard
from trainer import checkpoint as ckpt
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
from trainer.hardware import current_device_peak_flops
from trainer.health import LossGuard
from trainer.metrics import MetricsLogger
from trainer.optim import build_optimizer, build_scheduler, param_groups
from trainer.parallelize import parallelize

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_micro_batch_size(per_rank_seqs: int, cap: int) -> int:
    """The largest micro-batch <= cap that divides this rank's share of the global batch."""
    for size in range(min(cap, per_rank_seqs), 0, -1):
        if per_rank_seqs % size == 0:
            return size
    return 1


def prepare_tokenizer(config: JobConfig, run_dir: Path, env: DistEnv) -> Tokenizer:
    """The run's tokenizer: reuse the run's copy, load `tokenizer.path`, the prepared shards' or
    the `model.init_from` folder's (released weights need their own ids), or train one on rank 0."""
    target = run_dir / "tokenizer"
    init_dir = Path(config.model.init_from.removeprefix("hf:")) if config.model.init_from else None
    if env.is_main and not Tokenizer.found_in(target):
        if config.tokenizer.path:
            tokenizer = Tokenizer.load(config.tokenizer.path)
        elif config.data.prepared:  # shards are tokenized already: use their tokenizer
            tokenizer = Tokenizer.load(config.data.prepared)
        elif init_dir is not None and Tokenizer.found_in(init_dir):
            tokenizer = Tokenizer.load(init_dir)
        else:
            logger.info("training a %d-piece tokenizer on data.train", config.tokenizer.vocab_size)
            tokenizer = train_tokenizer_on_sources(config.tokenizer, config.data)
        tokenizer.save(target)
    barrier()
    return Tokenizer.load(target)


def batch_split(config: JobConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) that make up the global batch on `world_size` ranks."""
    if config.global_batch_seqs % world_size:
        raise ConfigError(
            f"train.global_batch_tokens: {config.global_batch_seqs} sequences per step do not "
            f"split over {world_size} ranks"
        )
    per_rank = config.global_batch_seqs // world_size
    micro = config.train.micro_batch_size or derive_micro_batch_size(
        per_rank, config.train.max_micro_batch_size
    )
    if per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_size: {micro} does not divide the {per_rank} sequences per rank"
        )
    return micro, per_rank // micro


def parse_injections(spec: str | None) -> tuple[set[int], set[int]]:
    """Test hook `--inject nan@3,spike@7`: steps whose loss becomes NaN / 50x on rank 0."""
    nan_steps: set[int] = set()
    spike_steps: set[int] = set()
    for item in (spec or "").split(","):
        if not item:
            continue
        kind, _, step = item.partition("@")
        (nan_steps if kind == "nan" else spike_steps).add(int(step))
    return nan_steps, spike_steps


class Trainer:
    """Pretraining through the DeepSpeed engine; one instance per process."""

    def __init__(
        self,
        config: JobConfig,
        env: DistEnv,
        fail_at_step: int | None = None,
        stall_at_step: int | None = None,
        inject: str | None = None,
    ) -> None:
        self.config = config
        self.env = env
        self.run_dir = Path(config.run.dir)
        self.checkpoint_root = self.run_dir / "checkpoints"
        self.step = 0
        self.tokens_seen = 0
        self.skips = SkipCounter(strict=config.data.strict)
        # Test hooks: exit hard after a step (first attempt only, so a torchrun restart can
        # finish the run), or stall rank 1 forever to exercise collective timeouts.
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self._fail_at_step = fail_at_step if first_attempt else None
        self._stall_at_step = stall_at_step
        self._stop_signal: int | None = None
        self.preempted = False
        self._inject_nan_steps, self._inject_spike_steps = parse_injections(inject)
        train = config.train
        self.guard = LossGuard(
            train.spike_sigma,
            train.spike_window,
            train.spike_min_history,
            train.max_nonfinite_in_a_row,
        )
        self._eval_sets: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._snapshot_engine: async_checkpoint.SnapshotCheckpointEngine | None = None
        self._background_save = async_checkpoint.BackgroundSave()
        self.rollbacks = 0  # spike rollbacks so far (checkpointed)
        self.rollback_skipped_batches = 0  # batches whose updates a rollback discarded

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        config, env = self.config, self.env
        self.micro_batch_size, self.accumulation_steps = batch_split(config, env.world_size)
        micro = self.micro_batch_size
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
        self.precision = config.resolved_precision(cuda)
        if self.precision == "fp16" and not cuda:
            raise ConfigError(
                "parallel.precision: fp16 needs a CUDA device (DeepSpeed's CPU accelerator has no fp16); "
                "use bf16 or fp32"
            )
        config.parallel.precision = self.precision  # type: ignore[assignment]
        init_distributed(env, config.parallel.backend, timeout_s=config.parallel.init_timeout_s)
        seed_everything(config.run.seed)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_temporaries(self.checkpoint_root)
        barrier()

        self.tokenizer = prepare_tokenizer(config, self.run_dir, env)
        if config.model.vocab_size is None:
            config.model.vocab_size = self.tokenizer.vocab_size
        elif config.model.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} pieces"
            )
        if env.is_main:
            write_config(config, self.run_dir / "config.yaml")

        problem = check_expert_parallel(
            config.parallel.expert_parallel, config.model.n_experts, env.world_size
        )
        if problem:
            raise ConfigError(problem)
        self.model = build_model(config.model, self.device, seed=config.run.seed)
        if config.model.init_from:
            load_weights(self.model, config.model.init_from)
        parallelize(self.model, config.parallel)
        self.flops_per_token = flops_per_token(config.model, config.data.seq_len)

        # Before the engine exists: a checkpoint of another layout loads through a converted copy.
        self.resume_from, self.converted_from = self._prepare_resume()
        self.ds_config = build_deepspeed_config(
            config,
            micro,
            self.accumulation_steps,
            env.world_size,
            self.precision,
            load_universal=self.converted_from is not None and config.parallel.zero_stage > 0,
        )
        optimizer = build_optimizer(
            self.model, config.train, offload=config.parallel.offload == "cpu"
        )
        scheduler = build_scheduler(optimizer, config.train)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        if config.checkpoint.async_save:
            # DeepSpeed writes its files through this seam; ours only snapshots them.
            self._snapshot_engine = async_checkpoint.SnapshotCheckpointEngine(self.engine._config)
            self.engine.checkpoint_engine = self._snapshot_engine

        self.loader = build_train_loader(
            self.tokenizer,
            config.data,
            self.skips,
            config.global_batch_seqs,
            micro,
            env.rank,
            env.world_size,
        )
        self.peak_flops = current_device_peak_flops()
        self._maybe_resume()

    # ---------------------------------------------------------------- the step
    def loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        """Forward, backward, clip and step over one global batch; returns loss and grad norm.

        For MoE models the routers' auxiliary loss joins the backward; it is reported apart
        ("aux_loss") from the LM loss ("loss"), with the expert load ("moe_*").
        """
        loss_sum = aux_sum = 0.0
        grad_norm: float | None = None
        lr = self.optimizer.param_groups[0]["lr"]
        model = self.engine.module
        reason: str | None = None  # why this rank wants the step skipped
        skipped_before = int(self.engine.skipped_steps)
        dropped = False
        for inputs, labels in micro_batches:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            loss = self.loss_fn(self.engine(inputs, doc_ids=self._doc_ids(inputs)), labels)
            loss = loss * self._injected_fault()
            aux_loss = model.moe_aux_loss()  # MoE load-balancing + z-loss; 0 for dense
            total = loss + aux_loss if model.config.n_experts else loss
            bad = self.guard.classify(loss.item())
            if bad is not None:
                reason = reason or bad
                total = total * float("nan")  # poisoned gradients make every rank skip the step
            self.engine.backward(total)
            if self.engine.is_gradient_accumulation_boundary():
                grad_norm = self._grad_norm_before_step()
                if grad_norm is not None and not math.isfinite(grad_norm):
                    dropped = self._drop_gradients()
            self._engine_step(skip=dropped)
            loss_sum += loss.item()
            aux_sum += aux_loss.item()
        update_router_biases(model)  # aux-loss-free balancing: once per step, global load
        reported = self.engine.get_global_grad_norm()
        if reported is not None:
            grad_norm = float(reported)
        global_loss, global_aux, spikes = all_reduce_sum(
            [loss_sum / len(micro_batches), aux_sum / len(micro_batches), float(reason == "spike")],
            self.device,
        )
        skipped = dropped or int(self.engine.skipped_steps) > skipped_before
        mean_loss = global_loss / self.env.world_size
        spike = skipped and spikes > 0 and math.isfinite(mean_loss)  # the same on every rank
        self.guard.after_step(mean_loss, skipped, "spike" if spike else "nonfinite")
        # An injected fault happens once: a rollback that replays the step must not meet it again.
        self._inject_nan_steps.discard(self.step + 1)
        self._inject_spike_steps.discard(self.step + 1)
        result: dict[str, Any] = {
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": grad_norm if grad_norm is not None else float("nan"),
            "skipped_update": skipped,
            "skipped_nonfinite": self.guard.skipped_nonfinite,
            "skipped_spikes": self.guard.skipped_spikes,
            "spike": spike,
        }
        if model.config.n_experts:  # this rank's expert load in the last micro-batch
            result |= {"aux_loss": global_aux / self.env.world_size, **model.moe_stats()}
            result["moe_tokens_per_expert"] = model.moe_tokens_per_expert()
        return result

    def _drop_gradients(self) -> bool:
        """ZeRO-0 has no overflow check of its own: with the gradients gone, AdamW skips."""
        for param in self.model.parameters():
            param.grad = None
        return True

    def _engine_step(self, skip: bool) -> None:
        """engine.step(); for a ZeRO-0 step without gradients, without DeepSpeed's clipping
        (which cannot handle an empty gradient list). The scheduler still advances."""
        if not skip:
            self.engine.step()
            return
        clip = self.engine._config.gradient_clipping
        self.engine._config.gradient_clipping = 0.0
        try:
            self.engine.step()
        finally:
            self.engine._config.gradient_clipping = clip

    def _injected_fault(self) -> float:
        """Test hook: a factor on rank 0's loss at the steps named by --inject (nan or spike)."""
        step = self.step + 1
        if self.env.rank == 0 and step in self._inject_nan_steps:
            return float("nan")
        if self.env.rank == 0 and step in self._inject_spike_steps:
            return 50.0
        return 1.0

    def _doc_ids(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """Per-token document ids when attention must not cross packed documents."""
        if not self.config.data.document_masking:
            return None
        return document_segments(inputs, self.tokenizer.eos_id)[0]

    def _grad_norm_before_step(self) -> float | None:
        """At ZeRO-0 in fp32 DeepSpeed reports no norm; there, grads are whole and local."""
        if self.config.parallel.zero_stage != 0 or self.precision != "fp32":
            return None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads).item()) if grads else 0.0

    # ---------------------------------------------------------------- loop
    def fit(self) -> None:
        """Train until train.max_steps, evaluating and checkpointing on schedule."""
        config, env = self.config, self.env
        metrics = MetricsLogger(self.run_dir, resume_step=self.step) if env.is_main else None
        tokens_per_step = config.train.global_batch_tokens
        progress = tqdm(
            total=config.train.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (env.is_main and config.train.progress),
            dynamic_ncols=True,
            mininterval=0.5,
        )
        self.engine.train()
        first_step = self.step
        previous_handlers = self._install_signal_handlers()
        try:
            if self.step == 0 and config.train.eval_every > 0:
                self._evaluate_and_log(metrics, progress)
            while self.step < config.train.max_steps:
                started = time.perf_counter()
                batch = self.loader.next_batch()
                data_s = time.perf_counter() - started
                result = self.train_step(batch)
                elapsed = time.perf_counter() - started
                self.step += 1
                self.tokens_seen += tokens_per_step
                if self.step == first_step + 1:
                    set_collective_timeout(config.parallel.step_timeout_s)
                tokens_per_s = tokens_per_step / elapsed
                tokens_by_source, skipped_by_reason = self._data_counts()
                record = {
                    "step": self.step,
                    "loss": result["loss"],
                    "lr": result["lr"],
                    "grad_norm": result["grad_norm"],
                    "tokens": self.tokens_seen,
                    "tokens_per_s": tokens_per_s,
                    "mfu": self._mfu(tokens_per_s),
                    "mem_gb": self._memory_gb(),
                    "data_wait_fraction": data_s / elapsed,
                    "skipped_records": sum(skipped_by_reason.values()),
                    "skipped_steps": int(self.engine.skipped_steps),
                    "skipped_by_reason": skipped_by_reason,
                    "rollbacks": self.rollbacks,
                    "rollback_skipped_batches": self.rollback_skipped_batches,
                    "tokens_by_source": tokens_by_source,
                    **{
                        k: v
                        for k, v in result.items()
                        if k.startswith(("aux_", "moe_", "skipped_"))
                    },
                }
                if metrics is not None and self.step % config.train.log_every == 0:
                    metrics.log(record)
                progress.set_postfix(loss=f"{result['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                progress.update(1)
                if result["spike"] and self._roll_back_after_spike():
                    progress.n = self.step
                    progress.refresh()
                    if self._stop_agreed():
                        self.preempted = True
                        break
                    continue
                if config.train.eval_every > 0 and self.step % config.train.eval_every == 0:
                    self._evaluate_and_log(metrics, progress)
                if config.checkpoint.every > 0 and self.step % config.checkpoint.every == 0:
                    self.save_checkpoint()
                if self._fail_at_step is not None and self.step == self._fail_at_step:
                    os._exit(17)  # simulated crash for resume tests: no cleanup, no final save
                if self._stall_at_step == self.step and env.rank == 1:
                    time.sleep(10**6)  # simulated hung rank: the others must time out
                if self._stop_agreed():
                    self.preempted = True
                    break
            if self.preempted:
                logger.warning(
                    "signal %s: saving at step %d and exiting", self._stop_signal, self.step
                )
            elif config.train.eval_every > 0 and self.step % config.train.eval_every != 0:
                self._evaluate_and_log(metrics, progress)
            self.wait_for_checkpoint()
            if not self._saved(self.step):
                self.save_checkpoint()
                self.wait_for_checkpoint()
        finally:
            if self._background_save.in_flight:  # training failed: still finish the last save
                try:
                    self._background_save.wait()
                except Exception as exc:
                    logger.error("the in-flight checkpoint save failed too: %s", exc)
            self._restore_signal_handlers(previous_handlers)
            self.loader.close()
            progress.close()
            if metrics is not None:
                metrics.close()

    # ---------------------------------------------------------------- preemption
    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM (preemption, torchrun shutdown) and SIGUSR1 (SLURM's warning) request a stop."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum: int, _frame: object) -> None:
            self._stop_signal = signum

        return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _stop_agreed(self) -> bool:
        """True on every rank as soon as any rank got a stop signal (one tiny all-reduce)."""
        (requested,) = all_reduce_sum([1.0 if self._stop_signal is not None else 0.0], self.device)
        return requested > 0

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.peak_flops is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak_flops * self.env.world_size)

    def _memory_gb(self) -> float:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 1e9
        return float(psutil.Process().memory_info().rss) / 1e9

    def _data_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Tokens by source and skipped records by reason, over the world (a collective when
        each rank reads only its own logical shards)."""
        counts = (self.loader.tokens_by_source(), dict(self.skips.counts))
        if not self.loader.counts_are_local:
            return counts
        parts = gather_from_ranks(counts)
        return sum_counts([p[0] for p in parts]), sum_counts([p[1] for p in parts])

    # ---------------------------------------------------------------- eval
    def _eval_batches(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """This rank's share of fixed validation sequences, per validation source (cached)."""
        if self._eval_sets is None:
            config = self.config
            wanted = config.train.eval_batches * self.micro_batch_size * self.env.world_size
            self._eval_sets = {}
            for source in config.data.validation:
                stream = build_packed_sequences(
                    [source],
                    "validation",
                    self.tokenizer,
                    config.data,
                    SkipCounter(config.data.strict),
                    loop=False,
                )
                sequences = [s for _, s in zip(range(wanted), stream, strict=False)]
                if not sequences:
                    raise DataError(
                        f"{source.path}: validation split yields no sequence of {config.data.seq_len} tokens"
                    )
                per_rank = max(1, len(sequences) // self.env.world_size)
                mine = sequences[self.env.rank * per_rank : (self.env.rank + 1) * per_rank]
                stacked = (
                    torch.stack(mine)
                    if mine
                    else torch.empty(0, config.data.seq_len + 1, dtype=torch.long)
                )
                self._eval_sets[source.label] = [
                    (chunk[:, :-1], chunk[:, 1:]) for chunk in stacked.split(self.micro_batch_size)
                ]
        return self._eval_sets

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss per split (token-weighted over all ranks)."""
        self.engine.eval()
        results = {}
        for split, batches in self._eval_batches().items():
            loss_sum, tokens = 0.0, 0
            for inputs, labels in batches:
                inputs = inputs.to(self.device)
                logits = self.engine(inputs, doc_ids=self._doc_ids(inputs))
                loss = F.cross_entropy(
                    logits.float().flatten(0, 1), labels.to(self.device).flatten(), reduction="sum"
                )
                loss_sum += loss.item()
                tokens += labels.numel()
            loss_sum, token_total = all_reduce_sum([loss_sum, float(tokens)], self.device)
            results[split] = loss_sum / token_total
        self.engine.train()
        return results

    def _evaluate_and_log(self, metrics: MetricsLogger | None, progress: tqdm) -> None:
        for split, loss in self.evaluate().items():
            record = {
                "step": self.step,
                "eval_loss": loss,
                "eval_ppl": math.exp(min(loss, 50.0)),
                "split": split,
            }
            if metrics is not None:
                metrics.log(record, prefix=f"eval/{split}")
            if self.env.is_main:
                progress.write(
                    f"step {self.step}: eval {split} loss {loss:.4f} ppl {record['eval_ppl']:.2f}"
                )

    # ---------------------------------------------------------------- checkpoints
    def _saved(self, step: int) -> bool:
        return (self.checkpoint_root / ckpt.step_dir_name(step) / ckpt.MANIFEST).is_file()

    def trainer_state(self, data_state: dict[str, Any], skipped: dict[str, int]) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data": data_state,
            "skipped_records": skipped,
            "loss_guard": self.guard.state_dict(),
            "rollback": {
                "rollbacks": self.rollbacks,
                "skipped_batches": self.rollback_skipped_batches,
            },
            "world_size": self.env.world_size,
            "zero_stage": self.config.parallel.zero_stage,
            "precision": self.precision,
        }

    def save_checkpoint(self) -> Path:
        """Save every piece of state; visible only once complete (all ranks must call).

        With `checkpoint.async_save` the state is copied now and written in the background;
        the folder is published once every rank wrote its part (see trainer.async_checkpoint).
        """
        started = time.perf_counter()
        name = ckpt.step_dir_name(self.step)
        tmp = self.checkpoint_root / f"{ckpt.TMP_PREFIX}{name}"
        final = self.checkpoint_root / name
        asynchronous = self._snapshot_engine is not None
        self._background_save.wait()  # at most one save in flight
        if self.env.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        barrier()
        self.engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
        weights = self._consolidated_state_dict()
        # Collectives: every rank's logical shards and skip counts.
        data_state = self.loader.state_dict(gather_from_ranks)
        _, skipped = self._data_counts()
        rng_state = ckpt.capture_rng_state()
        rng_file = tmp / "rng" / f"rank_{self.env.rank:05d}.pt"
        trainer_state = json.dumps(self.trainer_state(data_state, skipped), indent=1)
        if self._snapshot_engine is None:
            torch.save(rng_state, rng_file)
            barrier()
            if self.env.is_main:
                self._finish_checkpoint(tmp, weights, trainer_state)
            barrier()
        else:
            if self.env.is_main:  # ZeRO-0..2 hand out the live parameters: copy them now
                weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
            snapshot = self._snapshot_engine.take_snapshot()
            self._background_save.start(
                lambda: self._write_in_background(
                    tmp, snapshot, rng_state, rng_file, weights, trainer_state
                )
            )
        if self.env.is_main:
            logger.info(
                "checkpoint %s: training blocked %.3f s%s",
                name,
                time.perf_counter() - started,
                " (writing in the background)" if asynchronous else "",
            )
        return final

    def _write_in_background(
        self,
        tmp: Path,
        snapshot: list[tuple[Any, str]],
        rng_state: dict[str, Any],
        rng_file: Path,
        weights: dict[str, torch.Tensor],
        trainer_state: str,
    ) -> None:
        """The writer thread: this rank's files, its marker, and on rank 0 the publication."""
        assert self._snapshot_engine is not None
        try:
            written = self._snapshot_engine.write(snapshot)
            torch.save(rng_state, rng_file)
            async_checkpoint.fsync_files([*written, rng_file])
        except Exception as exc:
            async_checkpoint.mark_rank_done(
                tmp, self.env.rank, error=f"{type(exc).__name__}: {exc}"
            )
            raise
        async_checkpoint.mark_rank_done(tmp, self.env.rank)
        if self.env.is_main:
            async_checkpoint.wait_for_ranks(
                tmp, self.env.world_size, self.config.checkpoint.async_timeout_s
            )
            shutil.rmtree(tmp / async_checkpoint.RANKS_DIR)
            self._finish_checkpoint(tmp, weights, trainer_state)

    def _finish_checkpoint(
        self, tmp: Path, weights: dict[str, torch.Tensor], trainer_state: str
    ) -> None:
        """Rank 0, once every rank's files are in `tmp`: the rest, the manifest, publication."""
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in weights.items()},
            tmp / "model.safetensors",
        )
        (tmp / "trainer_state.json").write_text(trainer_state)
        write_config(self.config, tmp / "config.yaml")
        self.tokenizer.save(tmp)
        step = int(json.loads(trainer_state)["step"])
        ckpt.write_manifest(
            tmp,
            {
                "step": step,
                "world_size": self.env.world_size,
                "zero_stage": self.config.parallel.zero_stage,
                "tokenizer_sha256": self.tokenizer.sha256,
                "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
            },
        )
        final = ckpt.publish(tmp, self.checkpoint_root, step, self.config.checkpoint.keep)
        logger.info("saved checkpoint %s", final)

    def wait_for_checkpoint(self) -> None:
        """Let an in-flight asynchronous save finish and be published (all ranks must call)."""
        if self._snapshot_engine is None:
            return
        self._background_save.wait()
        barrier()  # rank 0's writer has published once it returned

    def _consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        if self.config.parallel.zero_stage == 3:
            # A collective: every rank gathers, only rank 0 receives the full dict.
            gathered = self.engine._zero3_consolidated_16bit_state_dict()
            return dict(gathered) if gathered is not None else {}
        return dict(self.engine.module.state_dict())

    def _prepare_resume(self) -> tuple[Path | None, Path | None]:
        """(checkpoint to resume from, its converted copy when its layout differs from this run's).

        Same world size and ZeRO stage (or ZeRO-0 on both sides) load natively. Otherwise rank 0
        converts the checkpoint once (trainer/reshard.py) and every rank loads the copy.
        """
        mode = self.config.checkpoint.resume
        if mode == "none":
            return None, None
        folder = ckpt.find_resume_checkpoint(self.checkpoint_root) if mode == "auto" else Path(mode)
        if folder is None:
            return None, None
        manifest = ckpt.verify_checkpoint(folder)
        saved_state = json.loads((folder / "trainer_state.json").read_text())
        layout = reshard.ResumeLayout(
            saved_world_size=int(manifest["world_size"]),
            saved_zero_stage=int(manifest["zero_stage"]),
            saved_precision=str(saved_state.get("precision", "fp32")),
            world_size=self.env.world_size,
            zero_stage=self.config.parallel.zero_stage,
            precision=self.precision,
        )
        if layout.native:
            if self.env.is_main:
                reshard.clear_cache(self.run_dir)
            return folder, None
        reshard.check_supported(folder, layout)
        problem = ""
        if self.env.is_main:
            logger.info("%s: %s; converting its optimizer state", folder, layout.describe())
            try:
                reshard.converted_checkpoint(folder, self.run_dir, layout, self._model_layout())
            except ckpt.CheckpointError as exc:
                problem = str(exc)
        # Doubles as the barrier after the conversion; every rank learns whether it failed.
        (failed,) = all_reduce_sum([1.0 if problem else 0.0], self.device)
        if failed:
            raise ckpt.CheckpointError(problem or f"{folder}: conversion failed on rank 0")
        converted = self.run_dir / reshard.RESHARD_DIR / reshard.cache_name(folder, layout)
        if not self.env.is_main:  # read DeepSpeed's pickles only after their hashes match
            ckpt.verify_checkpoint(converted)
        return folder, converted

    def _model_layout(self) -> reshard.ModelLayout:
        """Parameter names in the optimizer's group order, and shapes (for ZeRO-0 conversions)."""
        names = {id(param): name for name, param in self.model.named_parameters()}
        groups = param_groups(self.model, self.config.train.weight_decay)
        return reshard.ModelLayout(
            names_by_group=[
                [names[id(p)] for p in cast(list[torch.nn.Parameter], group["params"])]
                for group in groups
            ],
            shapes={name: tuple(p.shape) for name, p in self.model.named_parameters()},
        )

    def _maybe_resume(self) -> None:
        folder = self.resume_from
        if folder is None:
            return
        state = self._load_checkpoint(folder)
        self.tokens_seen = int(state["tokens_seen"])
        self.loader.load_state_dict(state["data"])
        if self.env.is_main or not self.loader.counts_are_local:  # summed over ranks
            self.skips.counts.update(state.get("skipped_records", {}))
        if "loss_guard" in state:
            self.guard.load_state_dict(state["loss_guard"])
        rollback = state.get("rollback", {})
        self.rollbacks = int(rollback.get("rollbacks", 0))
        self.rollback_skipped_batches = int(rollback.get("skipped_batches", 0))
        if self.env.is_main:
            logger.info("resumed from %s at step %d", folder, self.step)

    def _load_checkpoint(self, folder: Path) -> dict[str, Any]:
        """Model, optimizer, scheduler, step and this rank's RNG from `folder`; returns its
        trainer state (data position and counters), which the caller applies as it needs.

        The checkpoint this run resumed from is read through its converted copy when it was
        written in another layout (`_prepare_resume`); any later one (a rollback target) was
        written by this run and loads natively."""
        if folder != self.resume_from:
            ckpt.verify_checkpoint(folder)  # the resume checkpoint was verified when chosen
        state: dict[str, Any] = json.loads((folder / "trainer_state.json").read_text())
        converted = self.converted_from if folder == self.resume_from else None
        load_dir = converted or folder
        universal = converted is not None and self.config.parallel.zero_stage > 0
        ds_config = self.engine._config
        configured, ds_config.load_universal_checkpoint = (
            ds_config.load_universal_checkpoint,
            universal,
        )
        try:
            load_path, _ = self.engine.load_checkpoint(
                str(load_dir),
                tag="deepspeed",
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        finally:
            ds_config.load_universal_checkpoint = configured
        if load_path is None:
            raise ckpt.CheckpointError(f"{load_dir / 'deepspeed'}: DeepSpeed could not load it")
        if universal:
            # A universal load restores parameters only, and ZeRO-3 garbles the groups.
            from safetensors.torch import load_file

            reshard.restore_param_groups(self.optimizer, load_dir / "deepspeed")
            reshard.restore_buffers(self.engine.module, load_file(folder / "model.safetensors"))
        self.step = int(state["step"])
        # Each rank takes its own RNG state; ranks the checkpoint did not have take rank 0's.
        rng_file = folder / "rng" / f"rank_{self.env.rank:05d}.pt"
        if not rng_file.is_file():
            rng_file = folder / "rng" / "rank_00000.pt"
        rank_state = ckpt.safe_torch_load(rng_file)
        ckpt.restore_rng_state(rank_state)
        return state

    def _roll_back_after_spike(self) -> bool:
        """PaLM-style: on a loss spike (all ranks agree), reload the latest complete checkpoint
        but keep the data position, so the batches since that checkpoint, the spike's
        included, are never trained on again. False (the update stays skipped) when rollback
        is off, capped, or there is no checkpoint yet."""
        train = self.config.train
        if not train.spike_rollback:
            return False
        if self.rollbacks >= train.max_rollbacks:
            if self.env.is_main:
                logger.warning(
                    "loss spike at step %d: train.max_rollbacks=%d reached; skipping the update only",
                    self.step,
                    train.max_rollbacks,
                )
            return False
        self.wait_for_checkpoint()  # a save in flight becomes the latest complete checkpoint
        barrier()
        folder = ckpt.find_resume_checkpoint(self.checkpoint_root)
        if folder is None:
            if self.env.is_main:
                logger.warning(
                    "loss spike at step %d: no checkpoint to roll back to; skipping the update only",
                    self.step,
                )
            return False
        spike_step = self.step
        state = self._load_checkpoint(folder)
        # The guard's window goes back with the model; its counters keep what happened.
        self.guard.window.clear()
        self.guard.window.extend(float(x) for x in state["loss_guard"]["window"])
        skipped = spike_step - self.step
        self.rollbacks += 1
        self.rollback_skipped_batches += skipped
        if self.env.is_main:
            logger.warning(
                "loss spike at step %d: rolled back to %s (rollback %d of at most %d); "
                "skipping the %d batches since it",
                spike_step,
                folder.name,
                self.rollbacks,
                train.max_rollbacks,
                skipped,
            )
        return True


def load_weights(model: Transformer, source: str) -> None:
    """Copy weights into `model` from a scaletrain checkpoint folder or `hf:DIR` (`init_from`)."""
    from safetensors.torch import load_file

    if source.startswith("hf:"):
        from trainer.hf_checkpoint import load_hf_weights

        load_hf_weights(model, source)
        return

    path = Path(source)
    weights_file = path / "model.safetensors" if path.is_dir() else path
    if not weights_file.is_file():
        raise ConfigError(f"model.init_from: {source}: no model.safetensors found")
    state = load_file(weights_file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"model.init_from: {source}: weights do not fit the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


TrainerFactory = Callable[[JobConfig, DistEnv], Trainer]
