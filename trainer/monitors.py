"""Fine-tuning monitors as loop hooks: forgetting (retain-set loss) and sample diversity.

Both run at every eval of the loop (step 0, every `train.eval_every` steps, and the final eval
when the run ends off schedule) and keep their step-0 baselines in the checkpoint.

- `ForgettingMonitor`: the causal-LM eval loss on each `monitor.retain` source (plain text,
  packed like `data.validation`), logged as an eval line with `split` = the source's name and
  `forgetting` = the relative rise of that loss since step 0; one warning line past
  `monitor.max_forgetting`.
- `DiversityMonitor`: `monitor.samples` seeded samples per `monitor.prompts` entry (rendered
  with the run's chat template when it has one), logged as one line with `split` = "samples":
  `distinct_1`, `distinct_2`, `self_bleu`, `sample_entropy`, `sample_length`,
  `end_of_turn_rate`; the samples go to RUN_DIR/samples.jsonl. One warning line when
  distinct-2 falls below `monitor.min_diversity` x its step-0 value (mode collapse).

Metrics are computed on token ids (no word tokenizer is needed, and they are the units the
model chooses). Sampling uses its own seeded generators, never the global RNG, so a monitored
run trains exactly as an unmonitored one.

Under several ranks every rank evaluates its share of the retain sequences (sums all-reduced)
and generates the same samples (same seeds); rank 0 writes. At ZeRO-3 each forward gathers
parameters collectively, so there every sample runs its full `max_new_tokens` (cut at the stop
token afterwards): the same number of forwards on every rank whatever the samples hold.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data_pipeline.batch import Batch, causal_lm_batch
from data_pipeline.chat import CHAT_TEMPLATE_FILE, ChatTemplate, chat_stop_ids
from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.packing import validation_sequences
from trainer.distributed import all_reduce_sum
from trainer.hooks import Hook
from trainer.objectives.causal_lm import CausalLMObjective

if TYPE_CHECKING:
    from trainer.config import JobConfig
    from trainer.stages import StageContext
    from trainer.trainer import Trainer

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
SAMPLES_SPLIT = "samples"  # the `split` of the diversity line in metrics.jsonl
MONITOR_SECTION = "monitor"
BLEU_MAX_ORDER = 4
BLEU_EPSILON = 0.1  # numerator for an order with no matching n-gram (Chen & Cherry's method 1)


@dataclass
class MonitorConfig:
    """The `monitor` section: what fine-tuning runs watch at each eval.

    `retain`: eval sources (like `data.validation` entries) whose loss must not rise much;
    `prompts`: fixed prompts sampled `samples` times each; `max_forgetting`: relative rise of a
    retain loss since step 0 that triggers a warning; `min_diversity`: fraction of the step-0
    distinct-2 below which a warning is logged.
    """

    retain: list[SourceConfig] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    samples: int = 4
    max_forgetting: float = 0.1
    min_diversity: float = 0.5
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples: must be >= 1, got {self.samples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (0: greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.max_forgetting < 0:
            raise ValueError(f"max_forgetting: must be >= 0, got {self.max_forgetting}")
        if not 0.0 <= self.min_diversity <= 1.0:
            raise ValueError(f"min_diversity: must be in [0, 1], got {self.min_diversity}")
        if any(not isinstance(p, str) or not p for p in self.prompts):
            raise ValueError("prompts: every prompt must be a non-empty string")


def fine_tuning_monitors(config: JobConfig, ctx: StageContext | None = None) -> list[Hook]:
    """The monitor hooks a run's `monitor` section asks for (none without the section).

    `ctx` (the stage's context) may be left out when the hooks are made before setup: they
    take it from the trainer when training starts.
    """
    monitor = config.sections.get(MONITOR_SECTION)
    if monitor is None:
        return []
    hooks: list[Hook] = []
    if monitor.retain:
        hooks.append(ForgettingMonitor(monitor, ctx))
    if monitor.prompts:
        hooks.append(DiversityMonitor(monitor, ctx))
    return hooks


# ---------------------------------------------------------------------------- shared
class _EvalScheduledHook(Hook):
    """Runs `measure` at the loop's evals: step 0, every eval_every steps, the final one."""

    def __init__(self, config: MonitorConfig, ctx: StageContext | None) -> None:
        self.config = config
        self.ctx = ctx
        self.baseline: dict[str, float] | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        if self.ctx is None:
            self.ctx = trainer.eval_context
        self.prepare(trainer)
        if trainer.step == 0 and trainer.config.train.eval_every > 0:
            self.measure(trainer)

    def after_checkpoint_schedule(self, trainer: Trainer) -> None:
        every = trainer.config.train.eval_every
        if every > 0 and trainer.step % every == 0:
            self.measure(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        every = trainer.config.train.eval_every
        if every > 0 and trainer.step % every != 0 and not trainer.preempted:
            self.measure(trainer)

    def prepare(self, trainer: Trainer) -> None:
        """Build what measuring needs (once per process)."""

    def measure(self, trainer: Trainer) -> None:
        """Measure, log, warn (every rank calls)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        baseline = state.get("baseline")
        self.baseline = {k: float(v) for k, v in baseline.items()} if baseline else None


def append_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append records as JSON lines (non-finite numbers as null, like metrics.jsonl)."""
    with path.open("a") as handle:
        for record in records:
            clean = {
                k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in record.items()
            }
            handle.write(json.dumps(clean) + "\n")


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Drop lines a crashed run wrote after the checkpoint being resumed from."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(f"{line}\n" for line in kept))


# ---------------------------------------------------------------------------- forgetting
def forgetting(loss: float, baseline: float) -> float:
    """Relative rise of an eval loss since the baseline: loss / baseline - 1."""
    return loss / baseline - 1.0


class ForgettingMonitor(_EvalScheduledHook):
    """Eval loss on the retain sets and its relative rise since step 0."""

    name = "forgetting_monitor"

    def __init__(self, config: MonitorConfig, ctx: StageContext | None = None) -> None:
        super().__init__(config, ctx)
        self.retain_sets: dict[str, list[Batch]] | None = None

    def prepare(self, trainer: Trainer) -> None:
        if self.retain_sets is not None:
            return
        config, env = trainer.config, trainer.env
        micro = trainer.micro_batch_size
        wanted = config.train.eval_batches * micro * env.world_size
        self.retain_sets = {}
        for source in self.config.retain:
            sequences = validation_sequences(source, trainer.tokenizer, config.data, wanted)
            if not sequences:
                raise DataError(
                    f"monitor.retain: {source.path}: yields no sequence of {config.data.seq_len} tokens"
                )
            # The same share per rank (as the loop's eval sets), so ZeRO-3 gathers stay paired.
            per_rank = max(1, len(sequences) // env.world_size)
            mine = sequences[env.rank * per_rank : (env.rank + 1) * per_rank]
            stacked = (
                torch.stack(mine)
                if mine
                else torch.empty(0, config.data.seq_len + 1, dtype=torch.long)
            )
            self.retain_sets[source.label] = [
                causal_lm_batch(chunk, trainer.tokenizer.eos_id, config.data.document_masking)
                for chunk in stacked.split(micro)
            ]

    @torch.no_grad()
    def retain_losses(self, trainer: Trainer) -> dict[str, float]:
        """Mean eval loss per retain set over all ranks (a collective)."""
        assert self.retain_sets is not None
        objective = CausalLMObjective(trainer.config.data.seq_len)
        model = trainer.model  # the transformer, also inside a wrapper (a reward head)
        was_training = model.training
        model.eval()  # no LoRA dropout
        sums: list[float] = []
        for batches in self.retain_sets.values():
            loss_sum, tokens = 0.0, 0.0
            for batch in batches:
                num, den = objective.eval_step(model, batch.to(trainer.device))["eval_loss"]
                loss_sum += num
                tokens += den
            sums += [loss_sum, tokens]
        reduced = all_reduce_sum(sums, trainer.device)
        model.train(was_training)
        return {
            name: reduced[2 * i] / max(reduced[2 * i + 1], 1.0)
            for i, name in enumerate(self.retain_sets)
        }

    def records(
        self, step: int, losses: dict[str, float]
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Eval lines and warnings for `losses` at `step`; the first call sets the baseline."""
        if self.baseline is None and step == 0:
            self.baseline = dict(losses)
        records, warnings = [], []
        for split, loss in losses.items():
            base = (self.baseline or {}).get(split)
            rise = forgetting(loss, base) if base else None
            records.append(
                {
                    "step": step,
                    "eval_loss": loss,
                    "eval_ppl": math.exp(min(loss, 50.0)),
                    "split": split,
                    "forgetting": rise,
                }
            )
            if rise is not None and rise > self.config.max_forgetting:
                warnings.append(
                    f"forgetting: step {step}: retain split {split} eval loss rose "
                    f"{100 * rise:.1f}% since step 0 ({base:.4f} -> {loss:.4f}), past "
                    f"monitor.max_forgetting={self.config.max_forgetting}"
                )
        return records, warnings

    def measure(self, trainer: Trainer) -> None:
        losses = self.retain_losses(trainer)
        records, warnings = self.records(trainer.step, losses)
        for record in records:
            trainer.log_metrics(record, prefix=f"eval/{record['split']}")
        if trainer.env.is_main:
            for warning in warnings:
                logger.warning(warning)


# ---------------------------------------------------------------------------- diversity
def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """The n-grams of a sequence, in order."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams, pooled over `samples` (Li et al. 2016); 0 if none."""
    pooled = [gram for sample in samples for gram in ngrams(sample, n)]
    return len(set(pooled)) / len(pooled) if pooled else 0.0


def sentence_bleu(
    hypothesis: Sequence[int],
    references: Sequence[Sequence[int]],
    max_order: int = BLEU_MAX_ORDER,
    epsilon: float = BLEU_EPSILON,
) -> float:
    """BLEU of one hypothesis against references (Papineni et al. 2002), on token ids.

    Clipped n-gram precisions of orders 1..min(max_order, len(hypothesis)), uniform weights,
    geometric mean, times the brevity penalty exp(1 - r/c) when the hypothesis (length c) is
    shorter than the closest reference length r. An order with no match counts epsilon matches
    (Chen & Cherry 2014, method 1), so one missing 4-gram does not zero a near copy.
    """
    length = len(hypothesis)
    if length == 0 or not references:
        return 0.0
    orders = min(max_order, length)
    log_precision = 0.0
    for n in range(1, orders + 1):
        counts = Counter(ngrams(hypothesis, n))
        most: Counter[tuple[int, ...]] = Counter()
        for reference in references:
            for gram, count in Counter(ngrams(reference, n)).items():
                most[gram] = max(most[gram], count)
        matches = sum(min(count, most[gram]) for gram, count in counts.items())
        total = length - n + 1
        log_precision += math.log((matches if matches > 0 else epsilon) / total) / orders
    closest = min((abs(len(r) - length), len(r)) for r in references)[1]
    brevity = 1.0 if length >= closest else math.exp(1.0 - closest / length)
    return brevity * math.exp(log_precision)


def self_bleu(samples: Sequence[Sequence[int]]) -> float | None:
    """Mean BLEU of each sample against the others (Zhu et al. 2018); None below 2 samples."""
    if len(samples) < 2:
        return None
    scores = [
        sentence_bleu(sample, [other for j, other in enumerate(samples) if j != i])
        for i, sample in enumerate(samples)
    ]
    return sum(scores) / len(scores)


@dataclass
class Sample:
    """One generated answer: its tokens (without the stop token), whether it ended its turn,
    and the entropy of the sampling distribution at each generated position."""

    prompt: str
    tokens: list[int]
    ended: bool
    entropies: list[float]
    text: str = ""


def diversity_metrics(by_prompt: Sequence[Sequence[Sample]]) -> dict[str, float | None]:
    """The diversity line's numbers for samples grouped by prompt.

    distinct-n pool every sample; self-BLEU compares samples of the same prompt and averages
    over prompts; sample_entropy is the mean entropy over all generated positions.
    """
    flat = [sample for group in by_prompt for sample in group]
    tokens = [sample.tokens for sample in flat]
    bleus = [b for group in by_prompt if (b := self_bleu([s.tokens for s in group])) is not None]
    entropies = [h for sample in flat for h in sample.entropies]
    return {
        "distinct_1": distinct_n(tokens, 1),
        "distinct_2": distinct_n(tokens, 2),
        "self_bleu": sum(bleus) / len(bleus) if bleus else None,
        "sample_entropy": sum(entropies) / len(entropies) if entropies else None,
        "sample_length": sum(len(t) for t in tokens) / len(tokens) if tokens else 0.0,
        "end_of_turn_rate": sum(s.ended for s in flat) / len(flat) if flat else 0.0,
    }


def token_entropies(logits: torch.Tensor, temperature: float) -> list[float]:
    """Entropy (nats) of the sampling distribution softmax(logits / T) per row (T = 1 when
    greedy: the model's own distribution)."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    log_probs = torch.log_softmax(scaled, dim=-1)
    return [float(h) for h in -(log_probs.exp() * log_probs).sum(dim=-1)]


def sample_seed(run_seed: int, monitor_seed: int, prompt_index: int, sample_index: int) -> int:
    """The generator seed of sample `sample_index` of prompt `prompt_index` (the same at every
    eval, so two evals differ only by the model)."""
    seed = 0
    for part in (run_seed, monitor_seed, prompt_index, sample_index):
        seed = (seed * 1_000_003 + part) % 2**62
    return seed


class DiversityMonitor(_EvalScheduledHook):
    """Seeded samples on fixed prompts: diversity metrics, samples.jsonl, collapse warning."""

    name = "diversity_monitor"

    def __init__(self, config: MonitorConfig, ctx: StageContext | None = None) -> None:
        super().__init__(config, ctx)
        self.prompt_ids: list[list[int]] | None = None
        self.stop_ids: list[int] = []

    def prepare(self, trainer: Trainer) -> None:
        if trainer.env.is_main:  # a resumed run drops samples written after its checkpoint
            truncate_jsonl_after(trainer.run_dir / SAMPLES_FILE, trainer.step)
        if self.prompt_ids is not None:
            return
        tokenizer = trainer.tokenizer
        template = self._template(trainer)
        if template is not None:
            texts = [
                template.render_text([{"role": "user", "content": p}], add_generation_prompt=True)
                for p in self.config.prompts
            ]
            self.stop_ids = chat_stop_ids(template)
        else:
            texts = list(self.config.prompts)
            self.stop_ids = list(tokenizer.stop_ids)
        self.prompt_ids = [tokenizer.encode(text) for text in texts]
        for prompt, ids in zip(self.config.prompts, self.prompt_ids, strict=True):
            if not ids:
                raise DataError(f"monitor.prompts: {prompt!r} encodes to no tokens")

    def _template(self, trainer: Trainer) -> ChatTemplate | None:
        """The run's chat template: the stage's (ctx.extras), else RUN_DIR/tokenizer's file."""
        extras = self.ctx.extras if self.ctx is not None else {}
        template = extras.get("chat_template")
        if isinstance(template, ChatTemplate):
            return template
        path = trainer.run_dir / "tokenizer" / CHAT_TEMPLATE_FILE
        if path.is_file():
            return ChatTemplate(path.read_text(encoding="utf-8"), trainer.tokenizer, str(path))
        return None

    @torch.no_grad()
    def draw(self, trainer: Trainer) -> list[list[Sample]]:
        """`samples` answers per prompt, each with its own seed (the same at every eval)."""
        from model.generation import generate

        assert self.prompt_ids is not None
        config = self.config
        model = trainer.model
        fixed_length = trainer.config.parallel.zero_stage == 3 and trainer.env.world_size > 1
        was_training = model.training
        model.eval()
        groups: list[list[Sample]] = []
        for index, (prompt, ids) in enumerate(zip(config.prompts, self.prompt_ids, strict=True)):
            group = []
            for k in range(config.samples):
                seed = sample_seed(trainer.config.run.seed, config.seed, index, k)
                new = generate(
                    model,
                    ids,
                    config.max_new_tokens,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    stop_ids=() if fixed_length else self.stop_ids,
                    seed=seed,
                )
                # The prompt as generate saw it (cut from the left to fit the context).
                context = ids[-(model.config.max_seq_len - 1) :]
                if new:
                    inputs = torch.tensor([context + new[:-1]], device=trainer.device)
                    logits = model(inputs)[0, len(context) - 1 :]  # (len(new), vocab)
                    entropies = token_entropies(logits, config.temperature)
                else:
                    entropies = []
                stop = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
                tokens = new if stop is None else new[:stop]
                entropies = entropies if stop is None else entropies[: stop + 1]
                text = trainer.tokenizer.decode(tokens)
                group.append(Sample(prompt, tokens, stop is not None, entropies, text))
            groups.append(group)
        model.train(was_training)
        return groups

    def records(
        self, step: int, groups: Sequence[Sequence[Sample]]
    ) -> tuple[dict[str, Any], list[str]]:
        """The diversity line and warnings for `groups` at `step` (step 0 sets the baseline)."""
        metrics = diversity_metrics(groups)
        if self.baseline is None and step == 0:
            self.baseline = {k: float(v) for k, v in metrics.items() if v is not None}
        warnings = []
        base = (self.baseline or {}).get("distinct_2")
        current = metrics["distinct_2"]
        if base and current is not None and current < self.config.min_diversity * base:
            warnings.append(
                f"diversity: step {step}: distinct-2 of the monitor samples fell to "
                f"{current:.3f}, below monitor.min_diversity={self.config.min_diversity} x its "
                f"step-0 {base:.3f} (mode collapse?)"
            )
        return {"step": step, "split": SAMPLES_SPLIT, **metrics}, warnings

    def measure(self, trainer: Trainer) -> None:
        groups = self.draw(trainer)
        record, warnings = self.records(trainer.step, groups)
        trainer.log_metrics(record, prefix=f"eval/{SAMPLES_SPLIT}")
        if trainer.env.is_main:
            append_jsonl(
                trainer.run_dir / SAMPLES_FILE,
                [
                    {
                        "step": trainer.step,
                        "prompt": s.prompt,
                        "sample": s.text,
                        "ended": s.ended,
                    }
                    for group in groups
                    for s in group
                ],
            )
            for warning in warnings:
                logger.warning(warning)
