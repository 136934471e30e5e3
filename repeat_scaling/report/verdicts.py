"""Verdict rules: does a curve show what the papers found? Pure functions on numbers.

Every rule takes plain numbers (per-setting lists of seed values) and returns a
:class:`Verdict`: one of :data:`VERDICTS`, the numbers it was decided on and one
sentence saying why. :mod:`repeat_scaling.report.findings` gathers the numbers from run
directories; the rules here are unit-tested on synthetic curves.

Noise. Two settings are told apart only when their mean difference exceeds
:func:`threshold`: twice the standard error of the difference, from the pooled
standard deviation of every setting that has >= 2 seeds, and never less than
``floor`` (relative to the compared value, default 1%). Without any repeated seed the
floor alone is used and the verdict says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_ENOUGH = "not enough runs"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, NOT_ENOUGH)

#: The smallest relative difference ever called real (1% of the compared loss).
RELATIVE_FLOOR = 0.01
#: A setting is "memorising" when its repeated-subset loss is at most this share of its
#: held-out test loss.
MEMORISED_RATIO = 0.5


@dataclasses.dataclass
class Verdict:
    verdict: str
    why: str
    numbers: dict = dataclasses.field(default_factory=dict)


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def pooled_std(groups: Sequence[Sequence[float]]) -> float | None:
    """Pooled sample standard deviation over groups with >= 2 values (None if none)."""
    ss, dof = 0.0, 0
    for g in groups:
        if len(g) >= 2:
            m = mean(g)
            ss += sum((v - m) ** 2 for v in g)
            dof += len(g) - 1
    return math.sqrt(ss / dof) if dof else None


def threshold(
    noise: float | None, n_a: int, n_b: int, scale: float, floor: float = RELATIVE_FLOOR
) -> float:
    """Smallest difference of two means (of n_a and n_b seeds) called real."""
    base = abs(scale) * floor
    if noise is None:
        return base
    return max(base, 2.0 * noise * math.sqrt(1.0 / n_a + 1.0 / n_b))


def noise_note(noise: float | None) -> str:
    if noise is None:
        return f"no repeated seeds, so differences must exceed the {RELATIVE_FLOOR:.0%} floor"
    return f"seed spread (pooled std) {noise:.4f}"


def _curve(points: Mapping[float, Sequence[float]]) -> list[tuple[float, float, int]]:
    """(x, mean, n) sorted by x, for settings with at least one value."""
    return [(float(x), mean(v), len(v)) for x, v in sorted(points.items()) if len(v)]


def interior_peak(
    points: Mapping[float, Sequence[float]],
    baseline: Sequence[float] = (),
    min_points: int = 3,
) -> Verdict:
    """Double descent: is the loss against E highest strictly inside the E range?

    ``points`` maps E to the final test losses of its seeds; ``baseline`` holds the
    f = 0 losses. Reproduced when the highest mean sits at neither end and exceeds both
    ends by more than the noise threshold.
    """
    curve = _curve(points)
    noise = pooled_std([v for v in points.values()] + [list(baseline)])
    nums: dict = {
        "epochs": [c[0] for c in curve],
        "mean_loss": [c[1] for c in curve],
        "seeds": [c[2] for c in curve],
        "noise_std": noise,
        "baseline_loss": mean(baseline) if baseline else None,
    }
    if len(curve) < min_points:
        return Verdict(NOT_ENOUGH, f"{len(curve)} values of E; need >= {min_points}", nums)
    i = max(range(len(curve)), key=lambda k: curve[k][1])
    peak_e, peak, n_peak = curve[i]
    left, right = curve[0], curve[-1]
    over_left, over_right = peak - left[1], peak - right[1]
    t_left = threshold(noise, n_peak, left[2], peak)
    t_right = threshold(noise, n_peak, right[2], peak)
    nums.update(
        peak_epochs=peak_e,
        peak_loss=peak,
        over_left_end=over_left,
        over_right_end=over_right,
        threshold_left=t_left,
        threshold_right=t_right,
    )
    if baseline:
        nums["over_baseline"] = peak - mean(baseline)
        nums["over_baseline_ratio"] = peak / mean(baseline)
    if i in (0, len(curve) - 1):
        shape = "rises" if i == len(curve) - 1 else "falls"
        monotone = all(curve[k + 1][1] >= curve[k][1] for k in range(len(curve) - 1)) or all(
            curve[k + 1][1] <= curve[k][1] for k in range(len(curve) - 1)
        )
        how = "monotonically" if monotone else "overall"
        return Verdict(
            NOT_REPRODUCED,
            f"no interior peak: the loss {shape} {how} over E = {left[0]:g}..{right[0]:g}, "
            f"highest at the end E = {peak_e:g}",
            nums,
        )
    if over_left <= t_left or over_right <= t_right:
        return Verdict(
            NOT_REPRODUCED,
            f"the highest loss (E = {peak_e:g}) exceeds the ends by {over_left:+.4f} / "
            f"{over_right:+.4f}, inside the noise (needs > {t_left:.4f} / {t_right:.4f}; "
            f"{noise_note(noise)})",
            nums,
        )
    return Verdict(
        REPRODUCED,
        f"peak at E = {peak_e:g}: {over_left:+.4f} over E = {left[0]:g} and "
        f"{over_right:+.4f} over E = {right[0]:g} (thresholds {t_left:.4f} / {t_right:.4f}; "
        f"{noise_note(noise)})",
        nums,
    )


def memorisation_at_peak(
    peak_epochs: float | None,
    test: Mapping[float, float],
    repeated: Mapping[float, float],
    ratio: float = MEMORISED_RATIO,
) -> Verdict:
    """Does the peak sit where the repeated subset starts being memorised?

    ``test`` and ``repeated`` map E to the mean final test loss and repeated-subset
    loss. Memorised = repeated / test <= ``ratio``; the onset is the smallest memorised
    E. Reproduced when the peak is the onset or its neighbour on the E grid.
    """
    es = sorted(e for e in test if e in repeated and test[e] > 0)
    ratios = {e: repeated[e] / test[e] for e in es}
    nums: dict = {"epochs": es, "repeated_over_test": [ratios[e] for e in es]}
    if peak_epochs is None:
        return Verdict(NOT_ENOUGH, "no interior peak of the test loss to compare with", nums)
    if len(es) < 3 or peak_epochs not in ratios:
        return Verdict(NOT_ENOUGH, "repeated-subset loss missing at the peak or < 3 E", nums)
    memorised = [e for e in es if ratios[e] <= ratio]
    nums["peak_epochs"] = peak_epochs
    nums["ratio_at_peak"] = ratios[peak_epochs]
    if not memorised:
        return Verdict(
            NOT_REPRODUCED,
            f"no E memorises the subset (repeated/test loss >= {min(ratios.values()):.2f} "
            f"everywhere, > {ratio:g}); the peak at E = {peak_epochs:g} is not memorisation",
            nums,
        )
    onset = memorised[0]
    nums["onset_epochs"] = onset
    gap = abs(es.index(onset) - es.index(peak_epochs))
    where = ", ".join(f"E={e:g}: {ratios[e]:.2f}" for e in es)
    if gap <= 1:
        return Verdict(
            REPRODUCED,
            f"the subset is first memorised (repeated/test <= {ratio:g}) at E = {onset:g}, "
            f"{'at' if gap == 0 else 'next to'} the peak E = {peak_epochs:g} ({where})",
            nums,
        )
    return Verdict(
        NOT_REPRODUCED,
        f"memorisation starts at E = {onset:g}, {gap} grid steps from the peak "
        f"E = {peak_epochs:g} ({where})",
        nums,
    )


def lower_with(
    reference: Sequence[float],
    treated: Sequence[float],
    baseline: Sequence[float],
    noise_groups: Sequence[Sequence[float]] = (),
) -> Verdict:
    """Does a treatment (dropout) lower a degraded loss? Losses: lower is better.

    ``reference``: the degraded setting without the treatment; ``treated``: with it;
    ``baseline``: the undegraded (unique-data) runs. Reproduced when the reference is
    degraded beyond the noise and the treatment lowers it beyond the noise.
    """
    noise = pooled_std([list(reference), list(treated), list(baseline), *noise_groups])
    nums: dict = {"noise_std": noise}
    if not reference or not treated or not baseline:
        return Verdict(NOT_ENOUGH, "needs the degraded runs with and without it and a baseline")
    ref, trt, base = mean(reference), mean(treated), mean(baseline)
    deg, deg_t = ref - base, trt - base
    t_deg = threshold(noise, len(reference), len(baseline), base)
    t_gain = threshold(noise, len(reference), len(treated), ref)
    nums.update(
        loss_without=ref,
        loss_with=trt,
        baseline_loss=base,
        degradation_without=deg,
        degradation_with=deg_t,
        mitigated_share=(ref - trt) / deg if deg > 0 else None,
    )
    if deg <= t_deg:
        return Verdict(
            NOT_REPRODUCED,
            f"no degradation to mitigate: {ref:.4f} without vs {base:.4f} unique "
            f"({deg:+.4f}, needs > {t_deg:.4f}; {noise_note(noise)})",
            nums,
        )
    if ref - trt <= t_gain:
        return Verdict(
            NOT_REPRODUCED,
            f"degradation {deg:+.4f} without and {deg_t:+.4f} with: the difference "
            f"{ref - trt:+.4f} is inside the noise (needs > {t_gain:.4f}; {noise_note(noise)})",
            nums,
        )
    return Verdict(
        REPRODUCED,
        f"degradation over the unique baseline {deg:+.4f} without, {deg_t:+.4f} with "
        f"({(ref - trt) / deg:.0%} of it removed; {noise_note(noise)})",
        nums,
    )


def rises_with(points: Mapping[float, Sequence[float]], min_points: int = 3) -> Verdict:
    """Multi-epoch degradation: does the loss rise with E (at a fixed token budget)?

    Reproduced when the loss at the largest E exceeds the loss at the smallest E beyond
    the noise and the means rise with E in rank order (Spearman rho >= 0.5).
    """
    curve = _curve(points)
    noise = pooled_std(list(points.values()))
    nums: dict = {
        "epochs": [c[0] for c in curve],
        "mean_loss": [c[1] for c in curve],
        "seeds": [c[2] for c in curve],
        "noise_std": noise,
    }
    if len(curve) < min_points:
        return Verdict(NOT_ENOUGH, f"{len(curve)} values of E; need >= {min_points}", nums)
    first, last = curve[0], curve[-1]
    rise = last[1] - first[1]
    t = threshold(noise, first[2], last[2], first[1])
    rho = spearman([c[0] for c in curve], [c[1] for c in curve])
    nums.update(rise=rise, ratio=last[1] / first[1], threshold=t, spearman=rho)
    text = f"E = {first[0]:g} -> {last[0]:g}: {first[1]:.4f} -> {last[1]:.4f} ({rise:+.4f})"
    if rise > t and rho >= 0.5:
        return Verdict(REPRODUCED, f"{text}, rank correlation {rho:.2f}; {noise_note(noise)}", nums)
    return Verdict(
        NOT_REPRODUCED,
        f"{text}, rank correlation {rho:.2f} (needs a rise > {t:.4f} and >= 0.5; "
        f"{noise_note(noise)})",
        nums,
    )


def score_drop(
    baseline: Sequence[float], repeated: Sequence[float], chance: float, margin: float = 0.05
) -> Verdict:
    """Does a probe score (higher = more of the circuit) drop under repetition?

    Only a score above ``chance + margin`` in the baseline is tested (a circuit at
    chance level cannot be lost). Reproduced when the repeated runs score lower by more
    than ``margin`` and the noise threshold.
    """
    nums: dict = {"chance": chance}
    if not baseline or not repeated:
        return Verdict(NOT_ENOUGH, "needs baseline and repeated runs with the probe", nums)
    base, rep = mean(baseline), mean(repeated)
    noise = pooled_std([list(baseline), list(repeated)])
    nums.update(baseline_score=base, repeated_score=rep, drop=base - rep, noise_std=noise)
    if base <= chance + margin:
        return Verdict(
            NOT_ENOUGH,
            f"the baseline scores {base:.3f}, at chance level ({chance:.3f} + {margin:g}): "
            "no circuit to lose",
            nums,
        )
    t = max(margin, threshold(noise, len(baseline), len(repeated), base, floor=0.0))
    if base - rep > t:
        return Verdict(
            REPRODUCED, f"{base:.3f} -> {rep:.3f} under repetition (chance {chance:.3f})", nums
        )
    return Verdict(
        NOT_REPRODUCED,
        f"{base:.3f} -> {rep:.3f}: no drop beyond {t:.3f} (chance {chance:.3f})",
        nums,
    )


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); 0 when undefined."""

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = mean(rx), mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0
