"""Power-law fits of a metric against model size, and effective model size.

Hernandez et al. (2022) report the damage done by repeated data as a *model-size
multiplier*: fit the metric of the unique-data (f = 0) baselines as a function of the
parameter count N, then for a run trained on repeated data find the baseline size that
would reach the same metric, N_eff, and report N_eff / N.

Two forms are fitted (N in parameters, L in nats/token or any positive metric):

- ``offset``:      L(N) = E0 + (Nc / N) ** alpha      (irreducible term E0 >= 0)
- ``offset_free``: L(N) = (Nc / N) ** alpha           (Kaplan et al. 2020)

Both are fitted on log L with a robust (soft-L1) least-squares loss from scipy, so a
single bad run cannot drag the fit; the offset form is started from a grid of E0 values
and the best solution is kept. The exponent is parametrised as (alpha, c = alpha*ln Nc)
for good conditioning (Nc is often ~1e13 with alpha ~0.07).

Metrics where higher is better and that are bounded above (prefix-matching score, at
most 1) are fitted through their *deficit* ``1 - score``, which falls with N like a
loss; the inversion maps back through the same transform.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize

OFFSET = "offset"
OFFSET_FREE = "offset_free"
FORMS = (OFFSET, OFFSET_FREE)


class FitError(ValueError):
    """The points cannot support the requested fit (message says why)."""


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """A fitted L(N) = e0 + (nc / N) ** alpha (e0 = 0 for the offset-free form)."""

    form: str
    e0: float
    nc: float
    alpha: float
    n_points: int = 0
    rmse_log: float = 0.0  # root-mean-square residual of ln L (dimensionless)

    def predict(self, n: float | np.ndarray) -> np.ndarray:
        n = np.asarray(n, dtype=np.float64)
        return self.e0 + np.exp(self.alpha * (math.log(self.nc) - np.log(n)))

    def invert(self, value: float) -> float:
        """The N at which the fit reaches ``value`` (inf when value <= e0)."""
        if not math.isfinite(value) or value <= 0:
            return math.nan
        if not (self.nc > 0 and math.isfinite(self.nc) and self.alpha > 0):
            return math.nan  # a degenerate fit (e.g. flat in N) cannot be inverted
        gap = value - self.e0
        if gap <= 0:
            return math.inf
        return float(math.exp(math.log(self.nc) - math.log(gap) / self.alpha))

    def describe(self) -> str:
        if self.form == OFFSET:
            return f"L(N) = {self.e0:.4g} + ({self.nc:.4g}/N)^{self.alpha:.4g}"
        return f"L(N) = ({self.nc:.4g}/N)^{self.alpha:.4g}"


# Kaplan et al. (2020): L(N) = (N_c/N)^alpha_N for non-embedding parameters, in nats.
KAPLAN = PowerLawFit(form=OFFSET_FREE, e0=0.0, nc=8.8e13, alpha=0.076)


def _check_points(n: Sequence[float], y: Sequence[float], min_sizes: int) -> tuple:
    n_arr = np.asarray(n, dtype=np.float64)
    y_arr = np.asarray(y, dtype=np.float64)
    if n_arr.shape != y_arr.shape or n_arr.ndim != 1:
        raise FitError(
            f"sizes and values must be equal-length 1-D, got {n_arr.shape}, {y_arr.shape}"
        )
    keep = np.isfinite(n_arr) & np.isfinite(y_arr) & (n_arr > 0) & (y_arr > 0)
    n_arr, y_arr = n_arr[keep], y_arr[keep]
    distinct = len(np.unique(n_arr))
    if distinct < min_sizes:
        raise FitError(
            f"need >= {min_sizes} distinct model sizes with a positive value, have {distinct}"
        )
    return n_arr, y_arr


def _robust_scale(y: np.ndarray) -> float:
    """Soft-L1 transition scale for ln-residuals: 1% relative error."""
    del y
    return 0.01


def fit_offset_free(n: Sequence[float], y: Sequence[float]) -> PowerLawFit:
    """Fit L = (Nc/N)^alpha on ln L (robust soft-L1 loss, OLS start)."""
    n_arr, y_arr = _check_points(n, y, 2)
    log_n, log_y = np.log(n_arr), np.log(y_arr)
    slope, intercept = np.polyfit(log_n, log_y, 1)
    x0 = np.array([-slope, intercept])

    def residuals(p):
        alpha, c = p
        return c - alpha * log_n - log_y

    sol = optimize.least_squares(residuals, x0, loss="soft_l1", f_scale=_robust_scale(y_arr))
    alpha, c = sol.x
    if not alpha > 0:
        raise FitError(f"metric does not fall with model size (fitted alpha={alpha:.3g})")
    if c / alpha > 700.0:  # exp overflows float64: the loss is flat in N at these sizes
        raise FitError(
            f"metric barely falls with model size (fitted alpha={alpha:.3g}); Nc is not finite"
        )
    rmse = float(np.sqrt(np.mean(residuals(sol.x) ** 2)))
    return PowerLawFit(OFFSET_FREE, 0.0, float(math.exp(c / alpha)), float(alpha), len(n_arr), rmse)


def fit_offset(n: Sequence[float], y: Sequence[float]) -> PowerLawFit:
    """Fit L = E0 + (Nc/N)^alpha on ln L from a grid of E0 starts (robust loss)."""
    n_arr, y_arr = _check_points(n, y, 3)
    log_n, log_y = np.log(n_arr), np.log(y_arr)
    y_min = float(y_arr.min())

    def model(p):
        e0, alpha, c = p
        return np.log(e0 + np.exp(c - alpha * log_n))

    def residuals(p):
        return model(p) - log_y

    best = None
    for share in (0.0, 0.25, 0.5, 0.75, 0.9, 0.97):
        e0 = share * y_min
        slope, intercept = np.polyfit(log_n, np.log(y_arr - e0), 1)
        x0 = np.array([e0, max(-slope, 1e-3), intercept])
        try:
            sol = optimize.least_squares(
                residuals,
                x0,
                bounds=([0.0, 1e-6, -np.inf], [y_min * (1 - 1e-9), 10.0, np.inf]),
                loss="soft_l1",
                f_scale=_robust_scale(y_arr),
                x_scale="jac",
                max_nfev=2000,
            )
        except ValueError:
            continue
        if best is None or sol.cost < best.cost:
            best = sol
    if best is None:
        raise FitError("offset power-law fit failed from every starting point")
    e0, alpha, c = best.x
    rmse = float(np.sqrt(np.mean(residuals(best.x) ** 2)))
    return PowerLawFit(
        OFFSET, float(e0), float(math.exp(c / alpha)), float(alpha), len(n_arr), rmse
    )


def fit_power_law(n: Sequence[float], y: Sequence[float], form: str = OFFSET) -> PowerLawFit:
    """Fit either form (see module docstring); raises FitError with the reason."""
    if form == OFFSET:
        return fit_offset(n, y)
    if form == OFFSET_FREE:
        return fit_offset_free(n, y)
    raise ValueError(f"form={form!r} is not one of {', '.join(FORMS)}")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """A metric the effective-size machinery handles.

    ``higher_is_better`` metrics must be bounded above by ``upper``; they are fitted
    through the deficit ``upper - value``.
    """

    key: str
    label: str
    higher_is_better: bool = False
    upper: float = 1.0

    def to_loss(self, value: float | None) -> float | None:
        if value is None or not math.isfinite(value):
            return None
        return self.upper - value if self.higher_is_better else value


#: A fitted exponent below this is no power law (the metric is flat in N).
MIN_ALPHA = 1e-3
#: A probe score counts as a circuit only above its chance level plus this margin.
CHANCE_MARGIN = 0.05

METRICS = (
    MetricSpec("test_loss", "test loss (nats/token)"),
    MetricSpec("copy_loss", "copying loss (nats/token)"),
    MetricSpec("prefix_matching", "prefix-matching score", higher_is_better=True),
)


@dataclasses.dataclass
class BaselineFit:
    """Both power-law fits of one metric on one family's unique-data baselines."""

    metric: MetricSpec
    family: tuple
    points: list[tuple[float, float, str]]  # (N, metric value, run name)
    fits: dict[str, PowerLawFit] = dataclasses.field(default_factory=dict)
    failures: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def best(self) -> PowerLawFit | None:
        """The offset fit when it succeeded, else the offset-free one."""
        return self.fits.get(OFFSET) or self.fits.get(OFFSET_FREE)

    def effective_params(self, value: float | None) -> float | None:
        """Baseline size reaching ``value`` of the metric (None if not computable)."""
        fit = self.best
        loss = self.metric.to_loss(value)
        if fit is None or loss is None:
            return None
        n_eff = fit.invert(loss)
        return None if math.isnan(n_eff) else n_eff


def fit_baseline(metric: MetricSpec, family: tuple, points) -> BaselineFit:
    """Fit both forms on (N, value, name) points; failures are kept with their reason."""
    result = BaselineFit(metric=metric, family=family, points=list(points))
    pairs = [(n, metric.to_loss(v)) for n, v, _ in result.points]
    pairs = [(n, v) for n, v in pairs if v is not None and v > 0]
    sizes = [p[0] for p in pairs]
    values = [p[1] for p in pairs]
    for form in FORMS:
        try:
            fit = fit_power_law(sizes, values, form)
        except FitError as e:
            result.failures[form] = str(e)
            continue
        if fit.nc > 0 and math.isfinite(fit.nc) and fit.alpha > MIN_ALPHA:
            result.fits[form] = fit
        else:
            result.failures[form] = (
                f"degenerate fit (Nc = {fit.nc:.3g}, alpha = {fit.alpha:.3g}): the metric "
                "does not fall with N"
            )
    return result


def family_of(run) -> tuple:
    """Runs comparable across model sizes: (arch, objective, token budget, identity),
    the identity being everything trained except the size, its learning rate, the
    repetition setting, the regularisers, the seed and the run fine-tuned from
    (:meth:`runs.Run.identity`)."""
    from repeat_scaling.report import runs as runs_lib

    # init_from too: the fine-tuning report compares fine-tuned runs with from-scratch ones.
    drop = runs_lib.MODEL_SIZE + runs_lib.REPETITION + runs_lib.REGULARISATION + runs_lib.SEED
    drop += ("init_from",)
    return (run.arch, run.objective, run.total_tokens, run.identity(drop))


def fit_baselines(runs, metric: MetricSpec) -> dict[tuple, BaselineFit]:
    """Fit ``metric`` on the finished f = 0, unregularised runs of every family."""
    points: dict[tuple, list] = {}
    at_chance: dict[tuple, list] = {}
    for run in runs:
        if not run.finished or run.params is None or run.repeated_fraction != 0:
            continue
        if run.regularisation != "none":
            continue
        value = run.final(metric.key)
        if value is None:
            continue
        chance = run.chance(metric.key)
        if chance is not None and value <= chance + CHANCE_MARGIN:
            at_chance.setdefault(family_of(run), []).append(run.name)
            continue
        points.setdefault(family_of(run), []).append((run.params, value, run.name))
    out = {fam: fit_baseline(metric, fam, pts) for fam, pts in sorted(points.items(), key=str)}
    for fam, names in at_chance.items():
        fit = out.setdefault(fam, fit_baseline(metric, fam, []))
        for form in FORMS:
            if form not in fit.fits:
                fit.failures[form] = (
                    f"{len(names)} baseline(s) at chance level (<= chance + {CHANCE_MARGIN:g}) "
                    "left out"
                )
    return out


def effective_size_rows(runs, metrics: Sequence[MetricSpec] = METRICS):
    """Per-run effective model sizes for every metric.

    Returns (rows, baselines): ``rows`` maps run path -> {f"{key}_effective_params",
    f"{key}_multiplier"} (None where not computable: run unfinished, metric absent, or no
    baseline fit for its family); ``baselines`` maps metric key -> {family: BaselineFit}.
    The multiplier is N_eff / N (1 = no damage, 0.5 = as good as a model half the size).
    """
    baselines = {m.key: fit_baselines(runs, m) for m in metrics}
    rows: dict[str, dict] = {}
    for run in runs:
        row: dict[str, float | None] = {}
        for m in metrics:
            fit = baselines[m.key].get(family_of(run))
            n_eff = fit.effective_params(run.final(m.key)) if fit else None
            if n_eff is not None and not math.isfinite(n_eff):
                n_eff = None  # better than every size the fit can describe
            row[f"{m.key}_effective_params"] = n_eff
            row[f"{m.key}_multiplier"] = n_eff / run.params if n_eff and run.params else None
        rows[run.path] = row
    return rows, baselines
