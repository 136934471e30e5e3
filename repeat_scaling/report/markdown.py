"""Assemble the report: run every analysis, draw every figure, write ``report.md``.

``write_report`` is the whole pipeline behind ``python -m repeat_scaling.report``:
loaded runs in, ``report.md`` + ``*.png`` + ``*.csv`` out. The Markdown embeds each
figure with its caption and CSV, tabulates the power-law and data-constrained fits, and
lists what is missing (runs not started or still training, empty sweep cells, corrupt
or absent files, figures that could not be drawn and why).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Sequence

from repeat_scaling.report import data_constrained as dc
from repeat_scaling.report import figures
from repeat_scaling.report import fits as fits_lib
from repeat_scaling.report import runs as runs_lib

FITS_HEADER = ["metric", "arch", "objective", "total_tokens", "form", "e0", "nc", "alpha"]
FITS_HEADER += ["n_points", "rmse_log", "failure"]


@dataclasses.dataclass
class ReportSummary:
    """What ``write_report`` produced (paths relative to ``out_dir``)."""

    out_dir: str
    figures: list[figures.Figure]
    missing: list[str]
    n_runs: int
    n_finished: int

    @property
    def report_path(self) -> str:
        return os.path.join(self.out_dir, "report.md")


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return lines


def data_constrained_points(runs) -> list[dict]:
    """Finished runs as (N, D, U_D, measured loss) points for the Muennighoff law."""
    points = []
    for r in runs:
        loss = r.final("test_loss")
        if loss is None or r.params is None or r.unique_tokens is None:
            continue
        tokens = None
        for row in r.results:
            if row["step"] == r.steps:
                tokens = runs_lib._finite(row.get("tokens_seen"))
        tokens = tokens or r.total_tokens
        if not tokens:
            continue
        points.append(
            {
                "run": r.name,
                "model": r.model,
                "params": r.params,
                "tokens": tokens,
                "unique_tokens": min(r.unique_tokens, tokens),
                "measured_loss": loss,
                "predicted_published": dc.PUBLISHED.loss(
                    r.params, tokens, min(r.unique_tokens, tokens)
                ),
                "predicted_refit": None,
            }
        )
    return points


def _refit(points: list[dict], grid) -> tuple[dc.RefitResult | None, str | None]:
    if not points:
        return None, "no finished runs"
    try:
        result = dc.refit(
            [p["params"] for p in points],
            [p["tokens"] for p in points],
            [p["unique_tokens"] for p in points],
            [p["measured_loss"] for p in points],
            grid=grid,
        )
    except ValueError as e:
        return None, str(e)
    for p in points:
        p["predicted_refit"] = result.law.loss(p["params"], p["tokens"], p["unique_tokens"])
    return result, None


def write_report(
    runs: Sequence[runs_lib.Run],
    load_problems: Sequence[str],
    out_dir: str,
    dc_grid: dict | None = None,
    title: str = "repeat_scaling report",
) -> ReportSummary:
    """Write report.md, every figure (PNG) and every CSV into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    runs = list(runs)
    effective, baselines = fits_lib.effective_size_rows(runs)
    rows = figures.run_rows(runs, effective)
    points = data_constrained_points(runs)
    refit, refit_failure = _refit(points, dc_grid)

    figs = [
        figures.degradation_curves(runs, out_dir),
        figures.double_descent(runs, rows, out_dir),
        figures.fraction_scan(rows, out_dir),
        figures.baseline_fits(baselines, out_dir),
        figures.effective_params(rows, out_dir),
        figures.xue_epochs(rows, out_dir),
        figures.data_constrained(points, out_dir),
        figures.probes(runs, out_dir),
    ]

    fit_rows = []
    for key, fams in baselines.items():
        for fam, bf in fams.items():
            for form in fits_lib.FORMS:
                fit = bf.fits.get(form)
                fit_rows.append(
                    {
                        "metric": key,
                        "arch": fam[0],
                        "objective": fam[1],
                        "total_tokens": fam[2],
                        "form": form,
                        "e0": fit.e0 if fit else None,
                        "nc": fit.nc if fit else None,
                        "alpha": fit.alpha if fit else None,
                        "n_points": fit.n_points if fit else len(bf.points),
                        "rmse_log": fit.rmse_log if fit else None,
                        "failure": bf.failures.get(form),
                    }
                )
    figures.write_csv(os.path.join(out_dir, "fits.csv"), FITS_HEADER, fit_rows)

    # ----- what is missing -------------------------------------------------------------
    missing: list[str] = list(load_problems)
    for r in runs:
        if not r.finished:
            missing.append(f"run {r.name}: {r.progress()}")
    # Cells of the inferred grid (model sizes x repetition settings per family).
    missing += [f"sweep cell {cell}" for cell in runs_lib.missing_grid_cells(runs)]
    for r in runs:
        missing += [f"run {r.name}: {p}" for p in r.problems if "file missing" not in p]
    for fig in figs:
        missing += [f"figure {fig.name}: {note}" for note in fig.notes]
    # One line per (family, reason): the offset-free failure implies the offset one.
    fit_failures: dict[tuple, list[str]] = {}
    for key, fams in baselines.items():
        for fam, bf in fams.items():
            why = bf.failures.get(fits_lib.OFFSET_FREE) or bf.failures.get(fits_lib.OFFSET)
            if why:
                form = fits_lib.OFFSET_FREE if fits_lib.OFFSET_FREE in bf.failures else "offset"
                fit_failures.setdefault((fam[0], fam[1], form, why), []).append(key)
    for (arch, objective, form, why), keys in fit_failures.items():
        missing.append(
            f"baseline fit ({arch}, {objective}) of {', '.join(keys)}: no {form} fit, {why}"
        )
    if not any(baselines.values()):
        missing.append("effective sizes: no finished unique-data (f = 0) baseline runs")
    if refit_failure:
        missing.append(f"data-constrained refit: {refit_failure}")
    # Files absent in otherwise existing runs (e.g. a run without data_plan.json).
    for r in runs:
        if r.config is not None:
            missing += [f"run {r.name}: {p}" for p in r.problems if "file missing" in p]

    n_finished = sum(r.finished for r in runs)
    lines = [f"# {title}", ""]
    lines.append(
        f"Generated {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')} "
        f"from {len(runs)} run directories: {n_finished} finished, "
        f"{sum(r.status == runs_lib.STATUS_TRAINING for r in runs)} still training, "
        f"{sum(r.status == runs_lib.STATUS_NOT_EVALUATED for r in runs)} not evaluated, "
        f"{sum(r.status == runs_lib.STATUS_MISSING for r in runs)} missing. "
        "Final metrics come only from finished runs; unfinished runs appear in the "
        "curves (dashed)."
    )
    lines += ["", "## What is missing", ""]
    if missing:
        lines.append(
            "Runs not finished, files missing or corrupt, fits and figures that could not "
            "be made. A *sweep cell* is a (model, repetition setting) pair of the grid "
            "inferred from the runs of one architecture/objective/regularisation family "
            "that has no finished run."
        )
        lines.append("")
        lines += [f"- {m}" for m in missing]
    else:
        lines.append("Nothing: every run is finished and every figure drawn.")

    lines += ["", "## Runs", ""]
    lines += _table(
        [
            "run",
            "model",
            "N",
            "objective",
            "regularisation",
            "f",
            "E",
            "status",
            "final test loss",
            "N_eff/N",
        ],
        [
            (
                row["run"],
                row["model"],
                row["params"],
                row["objective"],
                row["regularisation"],
                row["repeated_fraction"],
                row["repeated_epochs"],
                row["status"],
                row["final_test_loss"],
                row["multiplier"],
            )
            for row in rows
        ],
    )

    lines += ["", "## Fits", "", "### Power laws on the unique-data baselines", ""]
    lines.append(
        "L(N) = E0 + (Nc/N)^alpha (`offset`) and (Nc/N)^alpha (`offset_free`), fitted on "
        "ln L with a robust soft-L1 loss; N = parameter count used by the report. "
        "Effective sizes invert the `offset` fit (the `offset_free` one when the former "
        f"failed). For reference, Kaplan et al.: {fits_lib.KAPLAN.describe()} "
        "(non-embedding parameters, WebText2)."
    )
    lines.append("")
    if fit_rows:
        lines += _table(
            [
                "metric",
                "arch",
                "objective",
                "form",
                "E0",
                "Nc",
                "alpha",
                "points",
                "rmse(ln L)",
                "failure",
            ],
            [
                (
                    r["metric"],
                    r["arch"],
                    r["objective"],
                    r["form"],
                    r["e0"],
                    r["nc"],
                    r["alpha"],
                    r["n_points"],
                    r["rmse_log"],
                    r["failure"] or "",
                )
                for r in fit_rows
            ],
        )
    else:
        lines.append("No baseline fits (see What is missing).")

    lines += ["", "### Data-constrained law (Muennighoff et al. 2023)", ""]
    lines.append(
        "L = E + A/N'^alpha + B/D'^beta with U_D = (1 - f) T + f T / E distinct tokens and "
        f"N_opt(U_D) = U_D / {dc.PUBLISHED.tokens_per_param:g} (Chinchilla rule). Refit: "
        "Huber (delta 1e-3) on ln L, L-BFGS-B from a grid of starts."
    )
    lines.append("")
    consts = ["A", "B", "E", "alpha", "beta", "rd_star", "rn_star"]
    table_rows = [("published",) + tuple(getattr(dc.PUBLISHED, c) for c in consts) + ("",)]
    if refit:
        table_rows.append(
            ("refit",)
            + tuple(float(getattr(refit.law, c)) for c in consts)
            + (f"{refit.n_points} runs, Huber {refit.objective:.3g}",)
        )
    lines += _table(["constants"] + consts + ["fit"], table_rows)
    if refit_failure:
        lines += ["", f"Refit not done: {refit_failure}."]

    lines += ["", "## Figures", ""]
    for fig in figs:
        lines += [f"### {fig.title}", "", fig.caption, ""]
        if fig.png:
            lines += [f"![{fig.title}]({fig.png})", ""]
        for note in fig.notes:
            lines += [f"*Not drawn: {note}.*", ""]
        lines.append("Data: " + ", ".join(f"[{c}]({c})" for c in fig.csvs) + ".")
        lines.append("")
    lines.append("Fit parameters: [fits.csv](fits.csv).")

    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return ReportSummary(out_dir, figs, missing, len(runs), n_finished)
