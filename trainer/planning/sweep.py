"""`scaletrain plan sweep`: an IsoFLOP grid of tiny models, a fitted L(N, D), and its plot.

Each budget C trains a few shapes around the Chinchilla optimum for exactly D = C / (6N)
tokens (cosine schedule over that horizon, as Hoffmann et al. do), measures held-out loss,
then fits L(N, D) = E + A/N^alpha + B/D^beta to every point (trainer.planning.scaling_laws).
Tokens are the bytes of the Python standard library's source (vocabulary 256), so the sweep
needs no tokenizer and no download; the budgets are tiny enough for a CPU.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.sources import stdlib_files
from model.config import ModelConfig
from model.flops import param_counts
from model.transformer import Transformer
from trainer.config import TrainConfig
from trainer.config_io import ConfigError
from trainer.losses.cross_entropy import cross_entropy_sum
from trainer.optim import lr_multiplier
from trainer.planning.scaling_laws import (
    EPOCH_2024,
    HOFFMANN_2022,
    FitResult,
    LossFit,
    fit_loss_law,
)

# Shapes of the grid, smallest to largest: (dim, n_layers). Tied embeddings, vocabulary 256.
SWEEP_SHAPES: list[tuple[int, int]] = [
    (16, 1),
    (16, 2),
    (32, 2),
    (48, 2),
    (64, 2),
    (64, 3),
    (96, 3),
    (128, 3),
    (128, 4),
    (160, 4),
]
BYTE_VOCAB = 256


@dataclass
class SweepRequest:
    """Budgets in FLOPs, shapes per budget, and where results go."""

    budgets: list[float]
    models_per_budget: int = 5
    out_dir: str = "docs/scaling"
    seq_len: int = 64
    vocab_size: int = BYTE_VOCAB
    bootstrap: int = 100
    seed: int = 0
    batch_seqs: int = 16
    lr: float = 3e-3
    eval_seqs: int = 128


@dataclass
class SweepPoint:
    """One trained model: its size, tokens, budget and held-out loss."""

    budget: float
    dim: int
    n_layers: int
    params: int
    tokens: int
    steps: int
    eval_loss: float
    seconds: float


@dataclass
class SweepResult:
    """All points, the fit, and the files written."""

    points: list[SweepPoint] = field(default_factory=list)
    fit: FitResult | None = None
    files: list[str] = field(default_factory=list)


def sweep_model(dim: int, n_layers: int, seq_len: int) -> ModelConfig:
    """A tiny Llama-style shape with 16-wide heads and tied byte embeddings."""
    return ModelConfig(
        vocab_size=BYTE_VOCAB,
        dim=dim,
        n_layers=n_layers,
        n_heads=max(1, dim // 16),
        multiple_of=16,
        max_seq_len=seq_len,
        tie_embeddings=True,
    )


def stdlib_bytes(limit_bytes: int) -> np.ndarray:
    """The first `limit_bytes` bytes of the standard library's .py files (the data pipeline's
    `builtin:stdlib` reader, test packages left out), in sorted order."""
    chunks: list[bytes] = []
    total = 0
    for name in stdlib_files("train", validation_percent=0.0):
        path = Path(name)
        if "test" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit_bytes:
            break
    return np.frombuffer(b"".join(chunks)[:limit_bytes], dtype=np.uint8).astype(np.int64)


def train_point(
    config: ModelConfig,
    tokens: int,
    train_data: torch.Tensor,
    eval_batch: torch.Tensor,
    request: SweepRequest,
    seed: int,
) -> tuple[float, int]:
    """Train `config` on `tokens` tokens; (held-out loss, steps)."""
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=request.lr, betas=(0.9, 0.95))
    batch_tokens = request.batch_seqs * request.seq_len
    steps = max(1, round(tokens / batch_tokens))
    # Linear warmup, then cosine to 10% over exactly the planned horizon (the run's schedule).
    schedule = TrainConfig(
        max_steps=steps, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1, schedule="cosine"
    )
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = request.lr * lr_multiplier(step, schedule)
        starts = torch.randint(
            0, train_data.numel() - request.seq_len - 1, (request.batch_seqs,), generator=generator
        )
        batch = torch.stack([train_data[s : s + request.seq_len + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])  # (B, T, vocab)
        loss = cross_entropy_sum(logits, batch[:, 1:]) / batch[:, 1:].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        logits = model(eval_batch[:, :-1])
        eval_loss = cross_entropy_sum(logits, eval_batch[:, 1:]) / eval_batch[:, 1:].numel()
    return float(eval_loss), steps


def shapes_for_budget(budget: float, count: int, seq_len: int) -> list[tuple[int, int]]:
    """`count` consecutive grid shapes centred on the Chinchilla approach-1 size for `budget`."""
    from trainer.planning.scaling_laws import approach1_optimum

    target, _ = approach1_optimum(budget)
    sizes = [param_counts(sweep_model(d, n, seq_len)).total for d, n in SWEEP_SHAPES]
    centre = min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i] / target)))
    start = min(max(0, centre - count // 2), max(0, len(SWEEP_SHAPES) - count))
    return SWEEP_SHAPES[start : start + count]


def run_sweep(request: SweepRequest) -> str:
    """Run the grid, fit the law, write results.json and isoflop.png; a text report."""
    if request.vocab_size != BYTE_VOCAB:
        raise ConfigError(
            f"--vocab-size: the sweep uses byte tokens (256), got {request.vocab_size}"
        )
    if not request.budgets or min(request.budgets) <= 0:
        raise ConfigError("--budgets: give positive FLOP budgets, e.g. 2e10,6e10,2e11")
    out = Path(request.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = torch.from_numpy(stdlib_bytes(24_000_000))
    held_out = data[-500_000:]
    train_data = data[:-500_000]
    rng = torch.Generator().manual_seed(request.seed + 1)
    starts = torch.randint(
        0, held_out.numel() - request.seq_len - 1, (request.eval_seqs,), generator=rng
    )
    eval_batch = torch.stack([held_out[s : s + request.seq_len + 1] for s in starts.tolist()])

    result = SweepResult()
    for budget in sorted(request.budgets):
        for dim, n_layers in shapes_for_budget(budget, request.models_per_budget, request.seq_len):
            config = sweep_model(dim, n_layers, request.seq_len)
            params = param_counts(config).total
            tokens = round(budget / (6 * params))
            began = time.time()
            loss, steps = train_point(config, tokens, train_data, eval_batch, request, request.seed)
            point = SweepPoint(
                budget, dim, n_layers, params, tokens, steps, loss, time.time() - began
            )
            result.points.append(point)
            print(
                f"C={budget:.2g} dim={dim} layers={n_layers} N={params:,} D={tokens:,} "
                f"steps={steps} loss={loss:.4f} ({point.seconds:.0f}s)",
                flush=True,
            )
    n = np.array([p.params for p in result.points], dtype=np.float64)
    d = np.array([p.tokens for p in result.points], dtype=np.float64)
    losses = np.array([p.eval_loss for p in result.points])
    result.fit = fit_loss_law(
        n, d, losses, bootstrap=request.bootstrap, seed=request.seed, name="sweep"
    )
    results_path = out / "results.json"
    results_path.write_text(json.dumps(_results_json(request, result), indent=2) + "\n")
    result.files.append(str(results_path))
    png = plot_isoflops(result, out / "isoflop.png")
    if png:
        result.files.append(png)
    return _report(result)


def _fit_json(fit: LossFit) -> dict[str, float]:
    return {"E": fit.E, "A": fit.A, "B": fit.B, "alpha": fit.alpha, "beta": fit.beta}


def _results_json(request: SweepRequest, result: SweepResult) -> dict[str, Any]:
    assert result.fit is not None
    fit = result.fit.fit
    total = fit.alpha + fit.beta
    return {
        "budgets": sorted(request.budgets),
        "seq_len": request.seq_len,
        "batch_tokens": request.batch_seqs * request.seq_len,
        "lr": request.lr,
        "points": [vars(p) for p in result.points],
        "fit": _fit_json(fit),
        "fit_objective": result.fit.objective,
        "bootstrap": request.bootstrap,
        "intervals_95": result.fit.intervals,
        "n_opt_exponent": fit.beta / total,
        "d_opt_exponent": fit.alpha / total,
        "published": {f.name: _fit_json(f) for f in (HOFFMANN_2022, EPOCH_2024)},
    }


def _report(result: SweepResult) -> str:
    assert result.fit is not None
    lines = ["constant   fitted     95% bootstrap      hoffmann2022  epoch2024"]
    for key in ("E", "A", "B", "alpha", "beta"):
        low, high = result.fit.intervals.get(key, (math.nan, math.nan))
        lines.append(
            f"{key:<8} {getattr(result.fit.fit, key):10.4g}  [{low:8.4g}, {high:8.4g}]  "
            f"{getattr(HOFFMANN_2022, key):10.4g}  {getattr(EPOCH_2024, key):10.4g}"
        )
    fit = result.fit.fit
    lines.append(
        f"N_opt ~ C^{fit.beta / (fit.alpha + fit.beta):.3f} (hoffmann2022 0.452, epoch2024 0.513)"
    )
    lines += [f"wrote {path}" for path in result.files]
    return "\n".join(lines)


def plot_isoflops(result: SweepResult, path: Path) -> str | None:
    """IsoFLOP curves (loss vs N per budget, measured and fitted) and the fitted frontier."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the figure is optional; the fit is already written
        print("matplotlib is not installed: skipping the PNG (pip install matplotlib)")
        return None
    assert result.fit is not None
    fit = result.fit.fit
    budgets = sorted({p.budget for p in result.points})
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, len(budgets)))
    for budget, color in zip(budgets, colors, strict=True):
        points = [p for p in result.points if p.budget == budget]
        left.scatter([p.params for p in points], [p.eval_loss for p in points], color=color)
        n_opt, d_opt = fit.optimum(budget)
        grid = np.logspace(  # wide enough to show the fitted optimum as well as the points
            math.log10(min(n_opt, *(p.params for p in points)) / 1.5),
            math.log10(max(n_opt, *(p.params for p in points)) * 1.5),
            100,
        )
        left.plot(
            grid,
            [fit.loss(n, budget / (6 * n)) for n in grid],
            color=color,
            label=f"C = {budget:.0e}",
        )
        left.plot([n_opt], [fit.loss(n_opt, d_opt)], marker="*", color=color, markersize=12)
    left.set_xscale("log")
    left.set_xlabel("parameters N (embeddings included)")
    left.set_ylabel("held-out loss (nats/byte)")
    left.set_title("IsoFLOP curves: points measured, lines fitted, * optimum")
    left.legend()
    span = np.logspace(math.log10(budgets[0] / 3), math.log10(budgets[-1] * 3), 50)
    right.plot(span, [fit.optimum(c)[0] for c in span], label="fitted here", color="black")
    for published, style in ((HOFFMANN_2022, "--"), (EPOCH_2024, ":")):
        right.plot(span, [published.optimum(c)[0] for c in span], style, label=published.name)
    best = [
        min((p for p in result.points if p.budget == b), key=lambda p: p.eval_loss) for b in budgets
    ]
    right.scatter(budgets, [p.params for p in best], color="red", zorder=3, label="best measured")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("training FLOPs C = 6ND")
    right.set_ylabel("compute-optimal N")
    right.set_title("Frontier")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return str(path)
