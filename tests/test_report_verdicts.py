"""The verdict rules of the report's findings, on synthetic curves."""

import math

import pytest

from repeat_scaling.report import verdicts as v


def test_interior_peak_beyond_the_seed_spread_is_reproduced():
    points = {1: [2.00, 2.01], 4: [2.05], 16: [2.40, 2.42], 64: [2.60, 2.58], 256: [2.20]}
    res = v.interior_peak(points, baseline=[1.99, 2.01])
    assert res.verdict == v.REPRODUCED
    assert res.numbers["peak_epochs"] == 64
    assert res.numbers["peak_loss"] == pytest.approx(2.59)
    assert res.numbers["over_left_end"] == pytest.approx(2.59 - 2.005)
    assert res.numbers["over_right_end"] == pytest.approx(0.39)
    assert res.numbers["over_baseline"] == pytest.approx(0.59)
    assert res.numbers["noise_std"] == pytest.approx(math.sqrt((0.5e-4 + 3 * 2e-4) / 4))
    assert "peak at E = 64" in res.why


def test_monotonic_rise_is_not_reproduced():
    res = v.interior_peak({4: [2.0], 16: [2.1], 64: [2.3], 256: [2.6]}, baseline=[1.9])
    assert res.verdict == v.NOT_REPRODUCED
    assert "rises monotonically" in res.why and "E = 256" in res.why


def test_peak_inside_the_noise_is_not_reproduced():
    # Seeds spread by ~0.1; the interior maximum is only 0.03 above the ends.
    points = {4: [2.0, 2.2], 16: [2.13, 2.13], 64: [2.05, 2.15]}
    res = v.interior_peak(points)
    assert res.verdict == v.NOT_REPRODUCED
    assert "inside the noise" in res.why
    assert res.numbers["peak_epochs"] == 16


def test_peak_without_seeds_must_clear_the_relative_floor():
    assert v.interior_peak({4: [2.0], 16: [2.01], 64: [2.0]}).verdict == v.NOT_REPRODUCED
    res = v.interior_peak({4: [2.0], 16: [2.5], 64: [2.1]})
    assert res.verdict == v.REPRODUCED and "no repeated seeds" in res.why


def test_too_few_points():
    res = v.interior_peak({4: [2.0], 16: [2.5]}, baseline=[1.9])
    assert res.verdict == v.NOT_ENOUGH and "2 values of E" in res.why
    assert v.rises_with({1: [2.0], 8: [2.2]}).verdict == v.NOT_ENOUGH


def test_memorisation_onset_at_or_next_to_the_peak():
    test = {4: 2.0, 16: 2.2, 64: 2.5, 256: 2.3}
    rep = {4: 1.9, 16: 1.5, 64: 0.8, 256: 0.05}
    res = v.memorisation_at_peak(64, test, rep)
    assert res.verdict == v.REPRODUCED and res.numbers["onset_epochs"] == 64
    assert v.memorisation_at_peak(256, test, rep).verdict == v.REPRODUCED  # next to it
    early = {4: 0.5, 16: 0.3, 64: 0.1, 256: 0.01}  # memorised everywhere: onset at E = 4
    assert v.memorisation_at_peak(64, test, early).verdict == v.NOT_REPRODUCED
    never = {4: 1.9, 16: 2.0, 64: 2.4, 256: 2.2}
    res = v.memorisation_at_peak(64, test, never)
    assert res.verdict == v.NOT_REPRODUCED and "no E memorises" in res.why
    assert v.memorisation_at_peak(None, test, rep).verdict == v.NOT_ENOUGH


def test_dropout_mitigation():
    base, ref = [2.00, 2.02], [2.30, 2.32]
    res = v.lower_with(ref, [2.10, 2.12], base)
    assert res.verdict == v.REPRODUCED
    assert res.numbers["mitigated_share"] == pytest.approx(0.2 / 0.3)
    assert v.lower_with(ref, [2.30, 2.29], base).verdict == v.NOT_REPRODUCED
    res = v.lower_with([2.01, 2.02], [2.0, 2.0], base)  # nothing degraded
    assert res.verdict == v.NOT_REPRODUCED and "no degradation to mitigate" in res.why
    assert v.lower_with([], [2.0], base).verdict == v.NOT_ENOUGH


def test_multi_epoch_degradation():
    assert v.rises_with({1: [2.0], 4: [2.05], 16: [2.2], 64: [2.5]}).verdict == v.REPRODUCED
    flat = v.rises_with({1: [2.0, 2.1], 4: [2.06, 2.0], 16: [2.02, 2.08]})
    assert flat.verdict == v.NOT_REPRODUCED
    down = v.rises_with({1: [2.5], 4: [2.3], 16: [2.0]})
    assert down.verdict == v.NOT_REPRODUCED and down.numbers["spearman"] == pytest.approx(-1)


def test_probe_drop_only_above_chance():
    assert v.score_drop([0.6, 0.62], [0.2, 0.25], chance=0.03).verdict == v.REPRODUCED
    assert v.score_drop([0.6, 0.62], [0.59, 0.6], chance=0.03).verdict == v.NOT_REPRODUCED
    at_chance = v.score_drop([0.03, 0.035], [0.02], chance=0.031)
    assert at_chance.verdict == v.NOT_ENOUGH and "chance level" in at_chance.why


def test_spearman():
    assert v.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert v.spearman([1, 2, 3], [3, 3, 3]) == 0.0
    assert v.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
