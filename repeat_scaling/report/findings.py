"""Findings: each result of REFERENCE.md section 1 that the runs can test, with numbers
and a verdict (``reproduced`` / ``not reproduced`` / ``not enough runs``).

Runs are grouped into *families*: every finished run that shares everything but the
sweep axis and the seed (:meth:`runs.Run.identity`). For each family:

- ``double_descent``: final test loss against E at a fixed f < 1 has an interior peak
  (:func:`verdicts.interior_peak`), against the f = 0 baseline of the same family and,
  when one was trained, the unique-data control: an f = 0 run of (1 - f) T tokens (the
  same steps minus the repeated ones), which separates the damage done by repetition
  from the unique tokens the repeated ones displaced;
- ``memorisation``: the peak sits where the repeated subset starts being memorised
  (:func:`verdicts.memorisation_at_peak`);
- ``effective_size``: N_eff / N of the peak setting from the L(N) fit of the f = 0 runs
  of >= 3 sizes (:mod:`fits`);
- ``prefix_matching_drop`` / ``copying_drop``: the probe score at the peak setting
  against the baseline, only when the baseline is above chance
  (:func:`verdicts.score_drop`);
- ``dropout_mitigation``: dropout (or staged dropout) lowers the loss of a degraded
  setting (:func:`verdicts.lower_with`);
- ``multi_epoch_degradation``: with all data repeated (f = 1), the loss rises with E at
  a fixed budget; the f = 0 runs of the family are its E = 1 point
  (:func:`verdicts.rises_with`);
- ``peak_shift``: across families that differ only in the model size, each with a
  reproduced peak, the peak moves to smaller E as N grows (the paper's poor region sits
  at larger E for smaller models).

Only finished runs count; the seed spread decides what is noise (:mod:`verdicts`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

from repeat_scaling.report import fits as fits_lib
from repeat_scaling.report import runs as runs_lib
from repeat_scaling.report import verdicts as v

PROBE_FINDINGS = (("prefix_matching", "prefix_matching_drop"), ("copying_score", "copying_drop"))
FINDINGS_NAME = "findings.json"


@dataclasses.dataclass
class Finding:
    kind: str
    family: str
    verdict: str
    statement: str
    numbers: dict
    runs: list[str]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _by_epochs(runs, key: str = "test_loss") -> dict[float, list[float]]:
    out: dict[float, list[float]] = {}
    for r in runs:
        x = r.final(key)
        if x is not None:
            out.setdefault(r.repeated_epochs, []).append(x)
    return out


def _means(points: dict[float, list[float]]) -> dict[float, float]:
    return {e: v.mean(xs) for e, xs in points.items() if xs}


def analyse(runs) -> list[Finding]:
    """Every finding the finished runs can test."""
    done = [r for r in runs if r.config is not None and r.finished]
    found: list[Finding] = []
    rep_drop, base_drop = runs_lib.E_SWEEP, runs_lib.ACROSS_REPETITION
    baselines = runs_lib.group([r for r in done if r.repeated_fraction == 0], base_drop)
    families = runs_lib.group([r for r in done if r.repeated_fraction > 0], rep_drop)
    everyone = [r for members in families.values() for r in members]
    size_fits = fits_lib.fit_baselines(done, fits_lib.METRICS[0])
    peaks: dict[tuple, list] = {}  # across model sizes: (params, model, peak E, names)
    for members in families.values():
        first = members[0]
        label = runs_lib.family_label(first, rep_drop, everyone)
        base = baselines.get(first.identity(base_drop), [])
        names = sorted(r.name for r in members + base)
        if first.repeated_fraction >= 1.0:
            found += _multi_epoch(members, base, label, names)
        else:
            dd = _double_descent(first, members, base, done, label, names, size_fits)
            found += dd
            peak = next((f for f in dd if f.kind == "double_descent"), None)
            if peak is not None and peak.verdict == v.REPRODUCED:
                key = first.identity(runs_lib.MODEL_SIZE + rep_drop)
                peaks.setdefault(key, []).append(
                    (first.params or 0.0, first.model, peak.numbers["peak_epochs"], names)
                )
    found += _dropout(done)
    found += [_peak_shift(sorted(p)) for p in peaks.values() if len(p) >= 2]
    return found


def _peak_shift(peaks: list) -> Finding:
    """Hernandez et al.: the poor region sits at larger E for smaller models."""
    where = ", ".join(f"{m} (N = {n:.3g}): E = {e:g}" for n, m, e, _ in peaks)
    es = [e for _, _, e, _ in peaks]
    nums = {"models": [m for _, m, _, _ in peaks], "params": [n for n, _, _, _ in peaks],
            "peak_epochs": es}  # fmt: skip
    names = sorted({x for *_, ns in peaks for x in ns})
    label = ", ".join(m for _, m, _, _ in peaks)
    if all(a > b for a, b in zip(es, es[1:])):
        why = f"the peak moves to smaller E as N grows: {where}"
        return Finding("peak_shift", label, v.REPRODUCED, why, nums, names)
    if all(a == b for a, b in zip(es, es[1:])):
        why = f"the peak stays at the same E across sizes (grid resolution): {where}"
    else:
        why = f"the peak does not move to smaller E as N grows (paper: it does): {where}"
    return Finding("peak_shift", label, v.NOT_REPRODUCED, why, nums, names)


def _control(first, done) -> list:
    """f = 0 runs like ``first`` but trained on its (1 - f) T unique tokens only."""
    drop = runs_lib.ACROSS_REPETITION + ("train.steps",)
    want = (1.0 - first.repeated_fraction) * (first.total_tokens or 0.0)
    key = first.identity(drop)
    return [
        r
        for r in done
        if r.repeated_fraction == 0
        and r.total_tokens
        and want
        and abs(r.total_tokens / want - 1.0) < 0.02
        and r.identity(drop) == key
    ]


def _double_descent(first, members, base, done, label, names, size_fits) -> list[Finding]:
    points = _by_epochs(members)
    means = _means(points)
    # The worst setting: the peak when there is one, else the highest mean loss (a
    # family of one E, e.g. the induction-head runs, is compared at that E).
    worst_e = max(means, key=means.get) if means else None
    if len(points) < 2:  # not a sweep over E: only the probes can be compared
        return _probe_drops(first, members, base, worst_e, label, names)
    base_losses = runs_lib.finals(base, "test_loss")
    peak = v.interior_peak(points, base_losses)
    control = _control(first, done)
    control_losses = runs_lib.finals(control, "test_loss")
    statement = peak.why
    if control_losses:
        c = v.mean(control_losses)
        top = max(means.values())
        last = means[max(means)]
        peak.numbers.update(control_loss=c, peak_over_control=top - c, last_over_control=last - c)
        statement += (
            f"; unique-data control ((1-f) T tokens): {c:.4f}, the peak is {top - c:+.4f} "
            f"and the largest E {last - c:+.4f} above it"
        )
        names = sorted(set(names) | {r.name for r in control})
    out = [Finding("double_descent", label, peak.verdict, statement, peak.numbers, names)]
    peak_e = peak.numbers.get("peak_epochs") if peak.verdict == v.REPRODUCED else None
    mem = v.memorisation_at_peak(
        peak_e, _means(points), _means(_by_epochs(members, "repeated_loss"))
    )
    out.append(Finding("memorisation", label, mem.verdict, mem.why, mem.numbers, names))
    at_peak = [r for r in members if r.repeated_epochs == worst_e]
    out.append(_effective(first, at_peak, peak, worst_e, size_fits, label))
    return out + _probe_drops(first, members, base, worst_e, label, names)


def _probe_drops(first, members, base, worst_e, label, names) -> list[Finding]:
    """Probe scores of the worst setting against the baseline (above chance only)."""
    out = []
    at_worst = [r for r in members if r.repeated_epochs == worst_e]
    for key, kind in PROBE_FINDINGS:
        chance = first.chance(key)
        if chance is None or not runs_lib.finals(base, key):
            continue
        drop = v.score_drop(runs_lib.finals(base, key), runs_lib.finals(at_worst, key), chance)
        why = f"at E = {worst_e:g}: {drop.why}" if worst_e is not None else drop.why
        out.append(Finding(kind, label, drop.verdict, why, drop.numbers, names))
    return out


def _effective(first, at_peak, peak, worst_e, size_fits, label) -> Finding:
    fit = size_fits.get(fits_lib.family_of(first))
    names = sorted(r.name for r in at_peak)
    sizes = len({p[0] for p in fit.points}) if fit else 0
    nums: dict = {"baseline_sizes": sizes}
    if not at_peak or fit is None or fit.best is None or sizes < 3:
        why = f"needs f = 0 baselines of >= 3 model sizes at this budget (have {sizes})"
        return Finding("effective_size", label, v.NOT_ENOUGH, why, nums, names)
    loss = v.mean(runs_lib.finals(at_peak, "test_loss"))
    n_eff = fit.effective_params(loss)
    n = first.params
    nums.update(peak_epochs=worst_e, loss=loss, params=n)
    if n_eff is None or not math.isfinite(n_eff) or not n:
        why = f"the fit cannot be inverted at loss {loss:.4f}"
        return Finding("effective_size", label, v.NOT_ENOUGH, why, nums, names)
    mult = n_eff / n
    smallest = min(p[0] for p in fit.points)
    nums.update(effective_params=n_eff, multiplier=mult, fit=fit.best.describe())
    where = f"N_eff / N = {mult:.3g} at E = {worst_e:g} ({fit.best.describe()})"
    if n_eff < smallest:
        where += f"; extrapolated below the smallest baseline ({smallest:.3g})"
    degraded = peak.numbers.get("over_baseline", 0.0) > peak.numbers.get("threshold_right", 0.0)
    verdict = v.REPRODUCED if mult < 1.0 and degraded else v.NOT_REPRODUCED
    if verdict == v.NOT_REPRODUCED:
        where += "; no degradation beyond the noise"
    return Finding("effective_size", label, verdict, where, nums, names)


def _multi_epoch(members, base, label, names) -> list[Finding]:
    points = _by_epochs(members)
    if len(points) < 2 and not base:  # one setting (e.g. a regulariser at one E)
        return []
    if base:
        points.setdefault(1.0, []).extend(runs_lib.finals(base, "test_loss"))
    res = v.rises_with(points)
    return [Finding("multi_epoch_degradation", label, res.verdict, res.why, res.numbers, names)]


def _dropout(done) -> list[Finding]:
    """Dropout vs none at the same repeated setting, against the unique baseline."""
    out = []
    drop = runs_lib.DROPOUT + runs_lib.SEED
    base_drop = runs_lib.DROPOUT + runs_lib.ACROSS_REPETITION
    groups = runs_lib.group([r for r in done if r.repeated_fraction > 0], drop)
    undropped = {k: [r for r in g if r.regularisation == "none"] for k, g in groups.items()}
    plain_base = runs_lib.group([r for r in done if r.repeated_fraction == 0], base_drop)
    for key, members in groups.items():
        ref = undropped[key]
        settings: dict[str, list] = {}
        for r in members:
            if "dropout" in r.regularisation:
                settings.setdefault(r.regularisation, []).append(r)
        first = members[0]
        base = [
            r for r in plain_base.get(first.identity(base_drop), []) if r.regularisation == "none"
        ]
        for setting, treated in sorted(settings.items()):
            res = v.lower_with(
                runs_lib.finals(ref, "test_loss"),
                runs_lib.finals(treated, "test_loss"),
                runs_lib.finals(base, "test_loss"),
            )
            label = f"{first.model}, {first.objective}, {first.setting}, {setting}"
            names = sorted(r.name for r in ref + treated + base)
            out.append(
                Finding("dropout_mitigation", label, res.verdict, res.why, res.numbers, names)
            )
    return out


def write_json(found: Sequence[Finding], out_dir: str) -> str:
    path = os.path.join(out_dir, FINDINGS_NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"findings": [x.to_json() for x in found]}, f, indent=1, default=_json)
        f.write("\n")
    return path


def _json(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return float(o)


def markdown(found: Sequence[Finding]) -> list[str]:
    lines = ["## Findings", ""]
    if not found:
        lines.append(
            "No finding can be tested yet: no family of finished runs with repeated data "
            "(see What is missing)."
        )
        return lines
    lines.append(
        "Each result of the papers that these runs can test, per family (runs sharing "
        "everything but the swept E and the seed), with the numbers behind the verdict "
        f"([{FINDINGS_NAME}]({FINDINGS_NAME}))."
    )
    lines += ["", "| finding | family | verdict | numbers |", "|---|---|---|---|"]
    for x in found:
        lines.append(
            f"| {x.kind.replace('_', ' ')} | {x.family} | **{x.verdict}** | {x.statement} |"
        )
    return lines
