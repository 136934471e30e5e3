"""Report fits: power laws recover known parameters; the Muennighoff law and its refit."""

import math

import numpy as np
import pytest

from repeat_scaling.report import data_constrained as dc
from repeat_scaling.report import fits

SIZES = np.logspace(6, 9, 8)  # parameters


@pytest.mark.parametrize("nc,alpha,e0", [(1e8, 0.3, 1.7), (5e13, 0.076, 0.9), (2e9, 0.5, 0.1)])
def test_offset_fit_recovers_known_parameters(nc, alpha, e0):
    rng = np.random.default_rng(0)
    losses = (e0 + (nc / SIZES) ** alpha) * (1 + 1e-5 * rng.standard_normal(SIZES.size))
    fit = fits.fit_power_law(SIZES, losses, fits.OFFSET)
    assert fit.nc == pytest.approx(nc, rel=0.01)
    assert fit.alpha == pytest.approx(alpha, rel=0.01)
    assert fit.e0 == pytest.approx(e0, rel=0.01)


def test_offset_free_fit_recovers_kaplan_constants_despite_an_outlier():
    losses = fits.KAPLAN.predict(SIZES)
    losses[3] *= 1.5  # one broken run: the robust loss must ignore it
    fit = fits.fit_power_law(SIZES, losses, fits.OFFSET_FREE)
    assert fit.nc == pytest.approx(fits.KAPLAN.nc, rel=0.01)
    assert fit.alpha == pytest.approx(fits.KAPLAN.alpha, rel=0.01)
    # Plain least squares would be pulled far off by that outlier.
    slope, _ = np.polyfit(np.log(SIZES), np.log(losses), 1)
    assert abs(-slope / fits.KAPLAN.alpha - 1) > 0.05


def test_inversion_gives_effective_size_and_handles_edges():
    fit = fits.PowerLawFit(fits.OFFSET, e0=1.7, nc=1e8, alpha=0.3)
    assert fit.invert(float(fit.predict(3e7))) == pytest.approx(3e7, rel=1e-9)
    assert fit.invert(1.7) == math.inf  # at/below the irreducible loss
    assert math.isnan(fit.invert(float("nan")))


def test_higher_is_better_metric_is_fitted_through_its_deficit():
    spec = fits.MetricSpec("prefix_matching", "score", higher_is_better=True)
    scores = 1 - (3e6 / SIZES) ** 0.4  # the deficit 1 - score is a pure power law
    points = [(n, s, f"run{i}") for i, (n, s) in enumerate(zip(SIZES, scores))]
    baseline = fits.fit_baseline(spec, ("decoder", "causal_lm", 1e9), points)
    assert baseline.fits[fits.OFFSET_FREE].alpha == pytest.approx(0.4, rel=0.01)
    assert baseline.effective_params(float(scores[2])) == pytest.approx(SIZES[2], rel=0.01)


def test_fit_errors_name_the_problem():
    with pytest.raises(fits.FitError, match="need >= 3 distinct model sizes"):
        fits.fit_power_law([1e6, 1e6, 2e6], [3.0, 3.1, 2.9], fits.OFFSET)
    with pytest.raises(fits.FitError, match="does not fall with model size"):
        fits.fit_power_law([1e6, 1e7], [2.0, 3.0], fits.OFFSET_FREE)
    with pytest.raises(ValueError, match="form='cubic'"):
        fits.fit_power_law(SIZES, SIZES, "cubic")


def test_muennighoff_law_reproduces_published_sanity_value():
    assert dc.PUBLISHED.loss(6.34e9, 242e9, 25e9) == pytest.approx(2.2256, abs=1e-4)


def test_muennighoff_law_limits():
    law = dc.PUBLISHED
    # No repetition and N below N_opt: the law is the plain Chinchilla form.
    plain = law.E + law.A / 1e8**law.alpha + law.B / 20e9**law.beta
    assert law.loss(1e8, 20e9, 20e9) == pytest.approx(plain, rel=1e-12)
    # Repeated tokens are worth less than unique ones, and saturate at R_D* epochs' worth.
    assert law.loss(1e8, 80e9, 20e9) > law.loss(1e8, 80e9, 80e9)
    assert law.effective_data(1e15, 1e9) == pytest.approx(1e9 * (1 + law.rd_star), rel=1e-6)


def test_refit_recovers_a_known_law():
    true = dc.DataConstrainedLaw(A=300.0, B=900.0, E=1.5, alpha=0.33, beta=0.3)
    sizes = np.repeat([1e7, 4e7, 1.6e8, 6.4e8], 5)
    fraction = np.tile([0.0, 0.5, 0.5, 1.0, 1.0], 4)
    epochs = np.tile([1.0, 4.0, 64.0, 2.0, 16.0], 4)
    tokens = np.full(sizes.shape, 4e9)
    unique = tokens * ((1 - fraction) + fraction / epochs)
    losses = true.loss(sizes, tokens, unique)
    grid = {"e": (0.5,), "a": (5.0,), "b": (5.0, 10.0), "alpha": (0.3,), "beta": (0.3,)}
    result = dc.refit(sizes, tokens, unique, losses, grid=grid)
    pred = result.law.loss(sizes, tokens, unique)
    assert np.max(np.abs(pred / losses - 1)) < 2e-3
    # Far better than the published constants, which were fitted to other data.
    assert np.max(np.abs(dc.PUBLISHED.loss(sizes, tokens, unique) / losses - 1)) > 0.05


def test_refit_refuses_too_few_points():
    with pytest.raises(ValueError, match="needs >= 7 finished runs, got 2"):
        dc.refit([1e7, 1e8], [1e9, 1e9], [1e9, 1e9], [3.0, 2.5])


def test_offset_free_fit_of_an_almost_flat_loss_is_a_fit_error_not_an_overflow():
    # Two sizes with nearly the same loss: alpha ~ 1e-5, Nc = exp(c/alpha) overflows.
    with pytest.raises(fits.FitError, match="barely falls"):
        fits.fit_offset_free([1e6, 2e6], [3.0, 2.99999])
