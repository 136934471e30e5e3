"""The data-constrained scaling law of Muennighoff et al. (2023), and its refit.

    L(N, D, U_D) = E + A / N'^alpha + B / D'^beta
    D' = U_D + U_D * R_D* * (1 - exp(-R_D / R_D*)),   R_D = max(D / U_D - 1, 0)
    N' = U_N + U_N * R_N* * (1 - exp(-R_N / R_N*)),   U_N = min(N, N_opt(U_D)),
                                                      R_N = max(N / U_N - 1, 0)

Units: N parameters, D training tokens, U_D unique (distinct) training tokens, L in
nats/token. Published constants: A = 520.8, B = 1487.7, E = 1.869,
alpha = beta = 0.3527, R_D* = 15.39, R_N* = 5.31.

N_opt(U_D), the compute-optimal parameter count for U_D tokens, follows the
Chinchilla rule of thumb of ``tokens_per_param`` = 20 training tokens per parameter
(Hoffmann et al. 2022): N_opt = U_D / 20. With it the published constants reproduce
the paper's sanity value L(N=6.34e9, D=242e9, U_D=25e9) = 2.2256 (2.22567); deriving
N_opt from the law's own A, B, alpha, beta instead (N_opt = 0.051 U_D) gives 2.2251.

For runs with a repeated *fraction* (Hernandez et al.) the law is applied with
U_D = (1 - f) T + f T / E, the distinct tokens seen; the law was fitted on uniform
repetition, so this is an approximation the report states.

Refit (as in the paper, after Hoffmann et al.): minimise the Huber loss (delta 1e-3) of
``LSE(a - alpha ln N', b - beta ln D', e) - ln L`` over all runs, where A = e^a,
B = e^b, E = e^e, with L-BFGS-B from a grid of initialisations, keeping the best.
R_D* and R_N* are fitted as ln R* (bounded to [1e-2, 1e4]).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize

HUBER_DELTA = 1e-3
CHINCHILLA_TOKENS_PER_PARAM = 20.0


@dataclasses.dataclass(frozen=True)
class DataConstrainedLaw:
    """Constants of the data-constrained law (see module docstring)."""

    A: float = 520.8
    B: float = 1487.7
    E: float = 1.869
    alpha: float = 0.3527
    beta: float = 0.3527
    rd_star: float = 15.39
    rn_star: float = 5.31
    tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM

    def n_opt(self, unique_tokens):
        """Compute-optimal parameters for ``unique_tokens`` (Chinchilla rule)."""
        return np.asarray(unique_tokens, dtype=np.float64) / self.tokens_per_param

    def effective_data(self, tokens, unique_tokens):
        """D': unique tokens plus the decaying value of repeated ones (tokens)."""
        d = np.asarray(tokens, dtype=np.float64)
        u = np.asarray(unique_tokens, dtype=np.float64)
        r = np.maximum(d / u - 1.0, 0.0)
        return u + u * self.rd_star * (-np.expm1(-r / self.rd_star))

    def effective_params(self, params, unique_tokens):
        """N': parameters beyond N_opt(U_D) count with decaying value (parameters)."""
        n = np.asarray(params, dtype=np.float64)
        u_n = np.minimum(n, self.n_opt(unique_tokens))
        r = np.maximum(n / u_n - 1.0, 0.0)
        return u_n + u_n * self.rn_star * (-np.expm1(-r / self.rn_star))

    def loss(self, params, tokens, unique_tokens):
        """Predicted loss L(N, D, U_D) in nats/token."""
        n_eff = self.effective_params(params, unique_tokens)
        d_eff = self.effective_data(tokens, unique_tokens)
        out = self.E + self.A / n_eff**self.alpha + self.B / d_eff**self.beta
        return out if np.ndim(out) else float(out)


PUBLISHED = DataConstrainedLaw()


def _check(params, tokens, unique_tokens, losses) -> tuple[np.ndarray, ...]:
    arrays = [np.asarray(a, dtype=np.float64) for a in (params, tokens, unique_tokens, losses)]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"N, D, U_D and L must be equal-length 1-D arrays, got {shapes}")
    for name, a in zip(("N", "D", "U_D", "L"), arrays):
        if not np.all(np.isfinite(a) & (a > 0)):
            raise ValueError(f"{name} must be finite and positive, got {a.tolist()}")
    return tuple(arrays)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _make_objective(n, d, u, log_y, tokens_per_param: float, delta: float):
    """The refit's objective: x = (e, a, b, alpha, beta, ln R_D*, ln R_N*) -> (loss, grad)."""
    # Quantities that do not depend on the constants.
    r_d = np.maximum(d / u - 1.0, 0.0)
    u_n = np.minimum(n, u / tokens_per_param)
    r_n = np.maximum(n / u_n - 1.0, 0.0)

    def repeated_value(base, r, log_star):
        """(ln X', d ln X' / d ln R*) for X' = base (1 + R* (1 - exp(-r / R*)))."""
        star = math.exp(log_star)
        decay = np.exp(-r / star)
        value = base * (1.0 + star * (1.0 - decay))
        grad = base * star * (1.0 - decay - (r / star) * decay) / value
        return np.log(value), grad

    def objective(x) -> tuple[float, np.ndarray]:
        """Summed Huber loss of ln-residuals and its exact gradient."""
        e, a, b, alpha, beta, log_rd, log_rn = x
        log_n, dlog_n = repeated_value(u_n, r_n, log_rn)
        log_d, dlog_d = repeated_value(u, r_d, log_rd)
        stacked = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
        top = stacked.max(axis=0)
        pred = top + np.log(np.sum(np.exp(stacked - top), axis=0))
        weights = np.exp(stacked - pred)  # softmax over the three terms
        resid = pred - log_y
        dres = np.clip(resid, -delta, delta)  # Huber derivative
        w_n, w_d, w_e = weights
        grad = np.array(
            [
                np.sum(dres * w_e),
                np.sum(dres * w_n),
                np.sum(dres * w_d),
                -np.sum(dres * w_n * log_n),
                -np.sum(dres * w_d * log_d),
                -np.sum(dres * w_d * beta * dlog_d),
                -np.sum(dres * w_n * alpha * dlog_n),
            ]
        )
        return float(np.sum(_huber(resid, delta))), grad

    return objective


@dataclasses.dataclass(frozen=True)
class RefitResult:
    law: DataConstrainedLaw
    objective: float  # summed Huber loss of ln-residuals at the optimum
    n_points: int
    n_grid: int  # grid points scored


DEFAULT_GRID = {
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "log_rd": (math.log(15.39),),
    "log_rn": (math.log(5.31),),
}
# L-BFGS-B runs from this many of the best-scoring grid points.
DEFAULT_STARTS = 8
_BOUNDS = [(-5, 5), (-10, 40), (-10, 40), (0.0, 2.0), (0.0, 2.0), (-4.6, 9.2), (-4.6, 9.2)]


def refit(
    params: Sequence[float],
    tokens: Sequence[float],
    unique_tokens: Sequence[float],
    losses: Sequence[float],
    grid: dict[str, Sequence[float]] | None = None,
    tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM,
    delta: float = HUBER_DELTA,
    starts: int = DEFAULT_STARTS,
) -> RefitResult:
    """Refit all seven constants to measured losses (see module docstring).

    ``grid`` maps each of e, a, b, alpha, beta, log_rd, log_rn to its candidate
    starting values (DEFAULT_GRID follows Hoffmann et al.'s grid: 4500 points). Every
    grid point is scored and L-BFGS-B runs from the ``starts`` best of them; the best
    optimum wins. Needs at least 7 points.
    """
    n, d, u, y = _check(params, tokens, unique_tokens, losses)
    if len(y) < 7:
        raise ValueError(f"the data-constrained refit needs >= 7 finished runs, got {len(y)}")
    grid = {**DEFAULT_GRID, **(grid or {})}
    log_y = np.log(y)
    names = ("e", "a", "b", "alpha", "beta", "log_rd", "log_rn")

    def law_of(x) -> DataConstrainedLaw:
        e, a, b, alpha, beta, log_rd, log_rn = x
        return DataConstrainedLaw(
            A=math.exp(a),
            B=math.exp(b),
            E=math.exp(e),
            alpha=float(alpha),
            beta=float(beta),
            rd_star=math.exp(log_rd),
            rn_star=math.exp(log_rn),
            tokens_per_param=tokens_per_param,
        )

    objective = _make_objective(n, d, u, log_y, tokens_per_param, delta)

    candidates = np.array(list(itertools.product(*(grid[k] for k in names))), dtype=np.float64)
    with np.errstate(all="ignore"):
        scores = np.array([objective(x)[0] for x in candidates])
    scores[~np.isfinite(scores)] = np.inf
    best = None
    for x0 in candidates[np.argsort(scores, kind="stable")[: max(1, starts)]]:
        with np.errstate(all="ignore"):
            sol = optimize.minimize(
                objective,
                x0,
                jac=True,
                method="L-BFGS-B",
                bounds=_BOUNDS,
                options={"ftol": 1e-12, "gtol": 1e-9, "maxiter": 1000},
            )
        if np.isfinite(sol.fun) and (best is None or sol.fun < best.fun):
            best = sol
    if best is None:
        raise ValueError("the data-constrained refit failed from every starting point")
    return RefitResult(law_of(best.x), float(best.fun), len(y), len(candidates))
