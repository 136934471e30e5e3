"""Hernandez et al.'s repetition figures: loss curves, final loss against repeated epochs
(double descent) and against the repeated fraction, the unique-data baseline fits and the
effective model size multipliers; ``run_rows`` are their per-run table (double_descent.csv).

Axes follow the paper: tokens, epochs and parameters on log scales; losses in nats/token.
Finished runs are drawn solid, runs still training dashed.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from repeat_scaling.report import fits as fits_lib  # noqa: E402
from repeat_scaling.report import runs as runs_lib  # noqa: E402
from repeat_scaling.report.plotting import (  # noqa: E402
    Figure,
    _evaluated,
    _grid,
    _log_x_plain,
    _ok,
    _save,
    _sorted_models,
    colour,
    run_label,
)

DOUBLE_DESCENT_HEADER = [
    "run",
    "model",
    "arch",
    "objective",
    "regularisation",
    "params",
    "repeated_fraction",
    "repeated_epochs",
    "total_tokens",
    "unique_tokens",
    "status",
    "last_step",
    "steps",
    "final_test_loss",
    "best_test_loss",
    "latest_test_loss",
    "final_test_accuracy",
    "final_repeated_loss",
    "final_copy_loss",
    "final_prefix_matching",
    "effective_params",
    "multiplier",
    "copy_loss_effective_params",
    "copy_loss_multiplier",
    "prefix_matching_effective_params",
    "prefix_matching_multiplier",
]


def run_rows(runs, effective: dict) -> list[dict]:
    """One row per loaded run (double_descent.csv); effective from fits.effective_size_rows."""
    rows = []
    for r in runs:
        if r.config is None:
            continue
        eff = effective.get(r.path, {})
        rows.append(
            {
                "run": r.name,
                # Runs alike in everything but f, E and the seed share this key.
                "family": hash(r.identity(runs_lib.ACROSS_REPETITION)),
                "model": r.model,
                "arch": r.arch,
                "objective": r.objective,
                "regularisation": r.regularisation,
                "params": r.params,
                "repeated_fraction": r.repeated_fraction,
                "repeated_epochs": r.repeated_epochs,
                "total_tokens": r.total_tokens,
                "unique_tokens": r.unique_tokens,
                "status": r.status,
                "last_step": r.last_step,
                "steps": r.steps,
                "final_test_loss": r.final("test_loss"),
                "best_test_loss": r.best("test_loss"),
                "latest_test_loss": r.latest("test_loss"),
                "final_test_accuracy": r.final("test_accuracy"),
                "final_repeated_loss": r.final("repeated_loss"),
                "final_copy_loss": r.final("copy_loss"),
                "final_prefix_matching": r.final("prefix_matching"),
                "effective_params": eff.get("test_loss_effective_params"),
                "multiplier": eff.get("test_loss_multiplier"),
                "copy_loss_effective_params": eff.get("copy_loss_effective_params"),
                "copy_loss_multiplier": eff.get("copy_loss_multiplier"),
                "prefix_matching_effective_params": eff.get("prefix_matching_effective_params"),
                "prefix_matching_multiplier": eff.get("prefix_matching_multiplier"),
            }
        )
    return rows


def degradation_curves(runs, out_dir: str) -> Figure:
    """Test loss (top row) and repeated-subset loss vs training tokens, per model."""
    fig_info = Figure(
        "degradation_curves",
        "Test loss vs training tokens",
        "Held-out test loss (top) and loss on the repeated subset (bottom, memorisation) "
        "against tokens seen, one panel per model, one line per repetition setting. "
        "Hernandez et al. see test loss rise mid-training as the repeated loss nears zero.",
    )
    header = ["run", "model", "params", "setting", "objective", "regularisation", "status"]
    header += ["step", "tokens_seen", "metric", "value"]
    rows = []
    runs = _evaluated(runs)
    models = _sorted_models(runs)
    metrics = [("test_loss", "test loss (nats/token)")]
    if any(r.curve("repeated_loss")[1] for r in runs):
        metrics.append(("repeated_loss", "repeated-subset loss (nats/token)"))
    if runs:
        fig, axes = plt.subplots(
            len(metrics), len(models), figsize=(5 * len(models), 3.8 * len(metrics)), squeeze=False
        )
        for j, model in enumerate(models):
            members = sorted(
                (r for r in runs if r.model == model),
                key=lambda r: (r.repeated_fraction, r.repeated_epochs, r.name),
            )
            # One colour per run in every row, so a setting is the same line in both.
            colours = {r.name: colour(k, len(members)) for k, r in enumerate(members)}
            for i, (key, ylabel) in enumerate(metrics):
                ax = axes[i][j]
                for r in members:
                    xs, ys = r.curve(key)
                    steps = [row["step"] for row in r.results if _ok(row.get(key))]
                    for s, x, y in zip(steps, xs, ys):
                        rows.append(
                            {
                                "run": r.name,
                                "model": r.model,
                                "params": r.params,
                                "setting": r.setting,
                                "objective": r.objective,
                                "regularisation": r.regularisation,
                                "status": r.status,
                                "step": s,
                                "tokens_seen": x,
                                "metric": key,
                                "value": y,
                            }
                        )
                    if xs:
                        ax.plot(
                            xs,
                            ys,
                            "-" if r.finished else "--",
                            marker=".",
                            color=colours[r.name],
                            label=run_label(r, runs),
                        )
                if not ax.lines:
                    ax.text(0.5, 0.5, f"no {key.replace('_', ' ')} for {model}", ha="center",
                            va="center", transform=ax.transAxes)  # fmt: skip
                    ax.set_title(f"{model}: {key.replace('_', ' ')}")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    continue
                ax.set_xscale("log")
                ax.set_xlabel("training tokens seen")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{model}: {key.replace('_', ' ')}")
                if ax.lines:
                    ax.legend(fontsize=7)
        fig_info.png = _save(fig, out_dir, fig_info.name)
    else:
        fig_info.notes.append("no run has evaluation results yet")
    fig_info.write_points(out_dir, header, rows)
    fig_info.n_points = len(rows)
    return fig_info


def double_descent(runs, rows: list[dict], out_dir: str) -> Figure:
    """Final (filled) and best (hollow) test loss vs repeated epochs, one line per family."""
    fig_info = Figure(
        "double_descent",
        "Final test loss vs repeated epochs",
        "Final (filled markers, solid) and best-over-training (hollow markers, dotted: "
        "the early-stopping value) test loss against epochs on the repeated subset, one "
        "panel per repeated fraction, one line per family (runs alike in everything but "
        "E and the seed): the mean over seeds, error bars from the lowest to the highest "
        "seed; dashed horizontal lines are the family's unique-data (f = 0) baseline "
        "(mean over seeds). Hernandez et al. find a peak of damage at intermediate E "
        "(double descent).",
    )
    fig_info.write_points(out_dir, DOUBLE_DESCENT_HEADER, rows)
    done = [r for r in runs if r.config is not None and r.final("test_loss") is not None]
    rep_drop, base_drop = runs_lib.E_SWEEP, runs_lib.ACROSS_REPETITION
    families = runs_lib.group([r for r in done if 0 < r.repeated_fraction < 1], rep_drop)
    if not families:
        fig_info.notes.append(
            "no finished run with part of its data repeated (0 < f < 1) and a final test loss"
        )
        return fig_info
    baselines = runs_lib.group([r for r in done if r.repeated_fraction == 0], base_drop)
    panels: dict[tuple, list] = {}
    for members in families.values():
        first = members[0]
        panels.setdefault((first.arch, first.objective, first.repeated_fraction), []).append(
            members
        )
    several = len({(arch, obj) for arch, obj, _ in panels}) > 1
    everyone = [r for m in families.values() for r in m]
    fig, axes = _grid(len(panels))
    for ax, ((arch, objective, frac), fams) in zip(axes, sorted(panels.items())):
        fams = sorted(
            fams, key=lambda m: (m[0].params or 0, runs_lib.family_label(m[0], rep_drop, everyone))
        )
        for k, members in enumerate(fams):
            c = colour(k, len(fams))
            label = runs_lib.family_label(members[0], rep_drop, everyone)
            for key, style, hollow in (("test_loss", "-o", False), (None, ":o", True)):
                by_e: dict[float, list[float]] = {}
                for r in members:
                    value = r.final("test_loss") if key else r.best("test_loss")
                    if value is not None:
                        by_e.setdefault(r.repeated_epochs, []).append(value)
                es = sorted(by_e)
                means = [float(np.mean(by_e[e])) for e in es]
                lo = [m - min(by_e[e]) for m, e in zip(means, es)]
                hi = [max(by_e[e]) - m for m, e in zip(means, es)]
                ax.errorbar(es, means, yerr=[lo, hi], fmt=style, color=c, capsize=2,
                            mfc="none" if hollow else c,
                            label=f"{label} {'best' if hollow else 'final'}")  # fmt: skip
                fig_info.n_points += len(es)
            base = runs_lib.finals(baselines.get(members[0].identity(base_drop), []), "test_loss")
            if base:
                ax.axhline(float(np.mean(base)), ls="--", color=c, alpha=0.6)
        _log_x_plain(ax)
        ax.set_xlabel("epochs on the repeated subset E")
        ax.set_ylabel("test loss (nats/token)")
        title = f"repeated fraction f = {frac:g}"
        ax.set_title(f"{arch}, {objective}: {title}" if several else title)
        ax.legend(fontsize=7)
    fig_info.png = _save(fig, out_dir, fig_info.name)
    return fig_info


def fraction_scan(rows: list[dict], out_dir: str) -> Figure:
    """Final test loss vs repeated fraction f at fixed E, one line per model."""
    fig_info = Figure(
        "fraction_scan",
        "Final test loss vs repeated fraction",
        "Final test loss against the fraction of training tokens drawn from the repeated "
        "subset, at fixed epochs E (one panel each), one line per model; dashed lines are "
        "the f = 0 baselines (Hernandez et al. scan f = 3%..90%).",
    )
    header = ["run", "model", "params", "arch", "objective", "repeated_epochs"]
    header += ["repeated_fraction", "final_test_loss"]
    done = [
        row
        for row in rows
        if row["final_test_loss"] is not None and row["regularisation"] == "none"
    ]
    cells: dict[tuple, set] = {}
    for row in done:
        if row["repeated_fraction"] > 0:
            key = (row["arch"], row["objective"], row["repeated_epochs"])
            cells.setdefault(key, set()).add(row["repeated_fraction"])
    panels = sorted(key for key, fractions in cells.items() if len(fractions) >= 2)
    out_rows = []
    if panels:
        fig, axes = _grid(len(panels))
        for ax, (arch, objective, epochs) in zip(axes, panels):
            family = [r for r in done if (r["arch"], r["objective"]) == (arch, objective)]
            models = sorted({(r["params"] or 0, r["model"]) for r in family})
            for i, (_, model) in enumerate(models):
                pts = sorted(
                    (
                        r
                        for r in family
                        if r["model"] == model
                        and r["repeated_fraction"] > 0
                        and r["repeated_epochs"] == epochs
                    ),
                    key=lambda r: r["repeated_fraction"],
                )
                out_rows += [{k: r[k] for k in header} for r in pts]
                pts = [(r["repeated_fraction"], r["final_test_loss"]) for r in pts]
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        "-o",
                        color=f"C{i % 10}",
                        label=model,
                    )
                base = [
                    r["final_test_loss"]
                    for r in family
                    if r["model"] == model and r["repeated_fraction"] == 0
                ]
                if base:
                    ax.axhline(float(np.mean(base)), ls="--", color=f"C{i % 10}", alpha=0.6)
            _log_x_plain(ax)
            ax.set_xlabel("repeated fraction f of training tokens")
            ax.set_ylabel("final test loss (nats/token)")
            ax.set_title(f"{arch}, {objective}: E = {epochs:g}")
            ax.legend(fontsize=7)
        fig_info.png = _save(fig, out_dir, fig_info.name)
    else:
        fig_info.notes.append("no epoch setting with finished runs at >= 2 repeated fractions")
    fig_info.write_points(out_dir, header, out_rows)
    fig_info.n_points = len(out_rows)
    return fig_info


def baseline_fits(baselines: dict, out_dir: str) -> Figure:
    """Unique-data baselines against N with both fitted power laws, per metric."""
    fig_info = Figure(
        "baseline_fits",
        "Power-law fits on the unique-data baselines",
        "Final metric of the f = 0 runs against model size (log-log) with the fits "
        "L(N) = E0 + (Nc/N)^alpha (solid) and (Nc/N)^alpha (dashed); higher-is-better "
        "scores are fitted through their deficit 1 - score. These fits define the "
        "effective model size.",
    )
    header = ["metric", "arch", "objective", "total_tokens", "run", "params", "value"]
    rows = []
    panels = [
        (k, fam, bf) for k, fams in baselines.items() for fam, bf in fams.items() if bf.points
    ]
    if panels:
        fig, axes = _grid(len(panels))
        for ax, (key, fam, bf) in zip(axes, panels):
            ns = [p[0] for p in bf.points]
            vals = [bf.metric.to_loss(p[1]) for p in bf.points]
            for n, v, name in bf.points:
                rows.append(
                    {
                        "metric": key,
                        "arch": fam[0],
                        "objective": fam[1],
                        "total_tokens": fam[2],
                        "run": name,
                        "params": n,
                        "value": v,
                    }
                )
            ax.plot(ns, vals, "o", color="k", label="f = 0 runs")
            grid = np.logspace(np.log10(min(ns)) - 0.3, np.log10(max(ns)) + 0.3, 100)
            for form, style in ((fits_lib.OFFSET, "-"), (fits_lib.OFFSET_FREE, "--")):
                fit = bf.fits.get(form)
                if fit:
                    ax.plot(grid, fit.predict(grid), style, label=fit.describe())
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("parameters N")
            ylabel = bf.metric.label
            ax.set_ylabel(f"1 - {ylabel}" if bf.metric.higher_is_better else ylabel)
            ax.set_title(f"{key}: {fam[0]}, {fam[1]}")
            ax.legend(fontsize=7)
        fig_info.png = _save(fig, out_dir, fig_info.name)
    else:
        fig_info.notes.append("no finished unique-data (f = 0) baseline runs to fit")
    fig_info.write_points(out_dir, header, rows)
    fig_info.n_points = len(rows)
    return fig_info


def effective_params(rows: list[dict], out_dir: str) -> Figure:
    """Model-size multiplier N_eff/N vs repeated epochs, per metric, lines per (model, f)."""
    fig_info = Figure(
        "effective_params",
        "Effective model size multipliers",
        "N_eff / N against repeated epochs: N_eff is the size of a unique-data model "
        "with the same final metric (inverted baseline fit). 1 = no damage; Hernandez "
        "et al.'s 800M model with 10% of tokens repeated 100 times sits near 0.5.",
    )
    header = ["run", "model", "params", "repeated_fraction", "repeated_epochs", "metric"]
    header += ["value", "effective_params", "multiplier"]
    out_rows = []
    keys = [
        ("test_loss", "final_test_loss", "effective_params", "multiplier"),
        ("copy_loss", "final_copy_loss", "copy_loss_effective_params", "copy_loss_multiplier"),
        (
            "prefix_matching",
            "final_prefix_matching",
            "prefix_matching_effective_params",
            "prefix_matching_multiplier",
        ),
    ]
    present = [k for k in keys if any(row[k[3]] is not None for row in rows)]
    if present:
        fig, axes = _grid(len(present))
        for ax, (metric, value_key, eff_key, mult_key) in zip(axes, present):
            groups: dict[tuple, list] = {}
            for row in rows:
                if row[mult_key] is None or row["repeated_fraction"] == 0:
                    continue
                out_rows.append(
                    {
                        "run": row["run"],
                        "model": row["model"],
                        "params": row["params"],
                        "repeated_fraction": row["repeated_fraction"],
                        "repeated_epochs": row["repeated_epochs"],
                        "metric": metric,
                        "value": row[value_key],
                        "effective_params": row[eff_key],
                        "multiplier": row[mult_key],
                    }
                )
                label = f"{row['model']}, f={row['repeated_fraction']:g}"
                if row["regularisation"] != "none":
                    label += f", {row['regularisation']}"
                groups.setdefault((row["params"] or 0, label), []).append(
                    (row["repeated_epochs"], row[mult_key])
                )
            for (_, label), pts in sorted(groups.items()):
                e, m = zip(*sorted(pts))
                ax.plot(e, m, "-o", label=label)
            ax.axhline(1.0, color="gray", ls=":", lw=1)
            _log_x_plain(ax)
            ax.set_yscale("log")
            ax.set_xlabel("epochs on the repeated subset E")
            ax.set_ylabel("effective size multiplier N_eff / N")
            ax.set_title(f"from {metric.replace('_', ' ')}")
            if ax.lines[:-1]:
                ax.legend(fontsize=7)
        fig_info.png = _save(fig, out_dir, fig_info.name)
    else:
        fig_info.notes.append(
            "no effective sizes: needs finished f = 0 baselines of >= 2 sizes and finished "
            "repeated runs of the same architecture, objective and token budget"
        )
    fig_info.write_points(out_dir, header, out_rows)
    fig_info.n_points = len(out_rows)
    return fig_info
