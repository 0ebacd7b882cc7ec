"""Compute-optimal scaling rules: Chinchilla approach 1, parametric loss fits, and a fitter.

All sizes count total parameters, embeddings included, the way Hoffmann et al. (2022) count
them (Pearce & Song 2024 trace the Kaplan/Chinchilla disagreement to exactly this choice).
Training compute is C = 6 * N * D throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from trainer.config_io import ConfigError


@dataclass(frozen=True)
class LossFit:
    """L(N, D) = E + A / N**alpha + B / D**beta, with N parameters and D training tokens."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def loss(self, n_params: float, n_tokens: float) -> float:
        """Predicted final training loss (nats per token) of N parameters trained on D tokens."""
        return self.E + self.A / n_params**self.alpha + self.B / n_tokens**self.beta

    def optimum(self, flops: float) -> tuple[float, float]:
        """(N, D) minimising L subject to 6 N D = flops, in closed form.

        Setting dL/dN = 0 along D = C / (6N) gives alpha A N^-alpha = beta B D^-beta, hence
        N = G (C/6)^(beta/(alpha+beta)), D = (C/6)^(alpha/(alpha+beta)) / G with
        G = (alpha A / (beta B))^(1/(alpha+beta))  (Hoffmann et al. 2022, eq. 4).
        """
        total = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / total)
        n_params = g * (flops / 6.0) ** (self.beta / total)
        return n_params, flops / (6.0 * n_params)


HOFFMANN_2022 = LossFit(
    "hoffmann2022", 1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022, approach 3 (eq. 10)"
)
EPOCH_2024 = LossFit(
    "epoch2024",
    1.8172,
    482.01,
    2085.43,
    0.3478,
    0.3658,
    "Besiroglu et al. (Epoch AI) 2024, Chinchilla scaling: a replication attempt",
)
LOSS_FITS: dict[str, LossFit] = {fit.name: fit for fit in (HOFFMANN_2022, EPOCH_2024)}

# Approach 1 (training-curve envelope): N_opt = G * C^a. Fitted by least squares in log space
# to the nine rows of Hoffmann et al. 2022, Table 3 (400M/1.92e19 ... 10T/1.30e28); the
# paper's own exponent is a = 0.50 (0.488-0.502). Every row is reproduced within 1.3%.
APPROACH1_EXPONENT = 0.4981
APPROACH1_COEFFICIENT = 0.09916
RULES = ("chinchilla", *LOSS_FITS, "custom")


def approach1_optimum(flops: float) -> tuple[float, float]:
    """(N, D) of Chinchilla approach 1 at `flops`; D follows from C = 6ND."""
    n_params = APPROACH1_COEFFICIENT * flops**APPROACH1_EXPONENT
    return n_params, flops / (6.0 * n_params)


def parse_loss_fit(text: str) -> LossFit:
    """A user fit from 'E=1.8,A=482,B=2085,alpha=0.35,beta=0.37' (all five keys required)."""
    values: dict[str, float] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("E", "A", "B", "alpha", "beta"):
            raise ConfigError(
                f"--fit: expected E=..,A=..,B=..,alpha=..,beta=.., got item {item.strip()!r}"
            )
        try:
            values[key] = float(value)
        except ValueError:
            raise ConfigError(f"--fit: {key} is not a number: {value!r}") from None
    missing = [k for k in ("E", "A", "B", "alpha", "beta") if k not in values]
    if missing:
        raise ConfigError(f"--fit: missing {', '.join(missing)}")
    if min(values["A"], values["B"], values["alpha"], values["beta"]) <= 0:
        raise ConfigError("--fit: A, B, alpha and beta must be positive")
    return LossFit("custom", source="user-supplied", **values)


def overtrained_optimum(flops: float, tokens_per_param: float) -> tuple[float, float]:
    """(N, D) with D = r N and 6 N D = C, i.e. N = sqrt(C / (6 r)): for inference-optimal plans."""
    if tokens_per_param <= 0:
        raise ConfigError(f"--tokens-per-param: must be positive, got {tokens_per_param}")
    n_params = math.sqrt(flops / (6.0 * tokens_per_param))
    return n_params, tokens_per_param * n_params


# ---------------------------------------------------------------------------- fitting
@dataclass(frozen=True)
class FitResult:
    """A fitted law, the objective it reached, and bootstrap intervals (2.5%, 97.5%) per constant."""

    fit: LossFit
    objective: float
    intervals: dict[str, tuple[float, float]]


def _huber(residual: torch.Tensor, delta: float) -> torch.Tensor:
    absolute = residual.abs()
    return torch.where(absolute <= delta, 0.5 * residual**2, delta * (absolute - 0.5 * delta))


def _fit_once(
    log_n: torch.Tensor,
    log_d: torch.Tensor,
    log_loss: torch.Tensor,
    inits: torch.Tensor,
    delta: float,
) -> tuple[np.ndarray, float]:
    """Best (a, b, e, alpha, beta) over a batch of starting points, by L-BFGS.

    Every start is an independent problem; summing their objectives lets one L-BFGS run
    optimise all of them at once (the gradients do not interact), then the best is refined.
    """

    def objective(theta: torch.Tensor) -> torch.Tensor:
        a, b, e, alpha, beta = (theta[:, i : i + 1] for i in range(5))
        predicted = torch.logsumexp(
            torch.stack([a - alpha * log_n, b - beta * log_d, e.expand(-1, log_n.numel())], dim=0),
            dim=0,
        )
        return _huber(predicted - log_loss, delta).sum(dim=1)

    def run(start: torch.Tensor, iterations: int) -> torch.Tensor:
        theta = start.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [theta], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe",
            tolerance_grad=1e-12, tolerance_change=1e-15,
        )  # fmt: skip

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = objective(theta).sum()
            value.backward()
            return value

        optimizer.step(closure)
        return theta.detach()

    theta = run(inits, 100)
    values = objective(theta)
    values = torch.where(torch.isfinite(values), values, torch.full_like(values, math.inf))
    best = theta[int(torch.argmin(values))].unsqueeze(0)
    best = run(best, 300)
    return best[0].numpy(), float(objective(best)[0])


def _init_grid(coarse: bool) -> torch.Tensor:
    """Starting points in the spirit of Hoffmann et al.'s grid (a, b in [0, 25], e in [-1, 1])."""
    if coarse:
        axes = [(0.0, 8.0), (0.0, 8.0), (0.5,), (0.3,), (0.3,)]
    else:
        axes = [(0.0, 6.0, 12.0), (0.0, 6.0, 12.0), (-1.0, 0.5), (0.2, 0.5, 1.0), (0.2, 0.5, 1.0)]
    mesh = torch.cartesian_prod(*(torch.tensor(axis, dtype=torch.float64) for axis in axes))
    return mesh


def _to_fit(theta: np.ndarray, name: str) -> LossFit:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return LossFit(name, math.exp(e), math.exp(a), math.exp(b), alpha, beta, "fitted here")


def fit_loss_law(
    n_params: np.ndarray,
    n_tokens: np.ndarray,
    losses: np.ndarray,
    bootstrap: int = 0,
    delta: float = 1e-3,
    seed: int = 0,
    name: str = "fitted",
) -> FitResult:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta as Hoffmann et al. (2022, approach 3) do.

    Minimises the Huber loss (delta 1e-3) between log L and
    LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, from a grid of
    starts. `bootstrap` > 0 refits on that many resamples (with replacement) of the points
    and reports the 2.5%-97.5% percentile interval of each constant.
    """
    log_n = torch.tensor(np.log(np.asarray(n_params, dtype=np.float64)))
    log_d = torch.tensor(np.log(np.asarray(n_tokens, dtype=np.float64)))
    log_loss = torch.tensor(np.log(np.asarray(losses, dtype=np.float64)))
    if log_n.numel() < 5:
        raise ConfigError(f"fit: need at least 5 (N, D, loss) points, got {log_n.numel()}")
    theta, objective = _fit_once(log_n, log_d, log_loss, _init_grid(coarse=False), delta)
    fit = _to_fit(theta, name)
    intervals: dict[str, tuple[float, float]] = {}
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples = []
        # Resamples start from the full-data optimum plus the coarse grid: close enough to
        # converge, cheap enough to repeat.
        starts = torch.cat([torch.tensor(theta).unsqueeze(0), _init_grid(coarse=True)])
        for _ in range(bootstrap):
            index = torch.tensor(rng.integers(0, log_n.numel(), log_n.numel()))
            sample, _ = _fit_once(log_n[index], log_d[index], log_loss[index], starts, delta)
            samples.append(sample)
        stacked = np.array(samples)
        columns = {
            "E": np.exp(stacked[:, 2]),
            "A": np.exp(stacked[:, 0]),
            "B": np.exp(stacked[:, 1]),
            "alpha": stacked[:, 3],
            "beta": stacked[:, 4],
        }
        for key, column in columns.items():
            low, high = np.percentile(column, [2.5, 97.5])
            intervals[key] = (float(low), float(high))
    return FitResult(replace(fit, name=name), objective, intervals)
