"""Assemble the report: run every analysis, draw every figure, write ``report.md``.

``write_report`` is the whole pipeline behind ``python -m repeat_scaling.report``:
loaded runs in, ``report.md`` + ``*.png`` + ``*.csv`` out. The Markdown embeds each
figure with its caption and CSV, tabulates the power-law and data-constrained fits, and
lists what is missing (launched runs not started or still training, corrupt
or absent files, figures that could not be drawn and why). Fine-tuned runs (with
``init_from.json``) and their from-scratch companions are split off first
(``finetune.split_runs``) and get their own section; the pre-training analyses see only
the other runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Sequence

from repeat_scaling.report import data_constrained as dc
from repeat_scaling.report import (
    data_constrained_figure,
    findings,
    finetune,
    plotting,
    probes_figure,
    repetition_figures,
    xue_epochs_figure,
)
from repeat_scaling.report import fits as fits_lib
from repeat_scaling.report import icl as icl_report
from repeat_scaling.report import runs as runs_lib

FITS_HEADER = ["metric", "arch", "objective", "total_tokens", "form", "e0", "nc", "alpha"]
FITS_HEADER += ["n_points", "rmse_log", "failure"]


@dataclasses.dataclass
class ReportSummary:
    """What ``write_report`` produced (paths relative to ``out_dir``)."""

    out_dir: str
    figures: list[plotting.Figure]
    missing: list[str]
    n_runs: int
    n_finished: int
    findings: list = dataclasses.field(default_factory=list)

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
                "family": f"{r.arch}, {r.objective}",
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
    families = {p["family"] for p in points}
    if len(families) > 1:
        return None, (
            f"the finished runs mix {len(families)} kinds of model ({'; '.join(sorted(families))}); "
            "refit one kind at a time (--runs)"
        )
    sizes = len({p["params"] for p in points})
    if sizes < 2:
        return None, f"needs >= 2 model sizes, the runs have {sizes}"
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
    all_runs = list(runs)
    ft = finetune.analyse(all_runs, out_dir, all_runs[0].param_key if all_runs else "non_embedding")
    runs = ft.pretrain_runs
    effective, baselines = fits_lib.effective_size_rows(runs)
    rows = repetition_figures.run_rows(runs, effective)
    points = data_constrained_points(runs)
    refit, refit_failure = _refit(points, dc_grid)
    figs = _draw_figures(runs, rows, baselines, points, out_dir)
    fit_rows = _fit_rows(baselines)
    plotting.write_csv(os.path.join(out_dir, "fits.csv"), FITS_HEADER, fit_rows)
    missing = _missing(all_runs, load_problems, figs, baselines, refit_failure, ft)
    found = findings.analyse(runs)
    findings.write_json(found, out_dir)

    n_finished = sum(r.finished for r in all_runs)
    lines = _header_lines(title, all_runs, n_finished)
    lines += ["", *findings.markdown(found)]
    lines += ["", *_missing_lines(missing)]
    lines += ["", *_runs_lines(rows, all_runs)]
    lines += ["", *_fits_lines(fit_rows, refit, refit_failure)]
    if ft.groups:
        lines += ["", *finetune_lines(ft)]
    lines += ["", *_figures_lines(figs)]
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return ReportSummary(
        out_dir, figs + ft.figures, missing, len(all_runs), n_finished, list(found)
    )


def _draw_figures(runs, rows, baselines, points, out_dir: str) -> list[plotting.Figure]:
    """Every pre-training figure (PNG + CSV in ``out_dir``), in the report's order."""
    figs = [
        repetition_figures.degradation_curves(runs, out_dir),
        repetition_figures.double_descent(runs, rows, out_dir),
        repetition_figures.fraction_scan(rows, out_dir),
        repetition_figures.baseline_fits(baselines, out_dir),
        repetition_figures.effective_params(rows, out_dir),
        xue_epochs_figure.xue_epochs(rows, out_dir),
        data_constrained_figure.data_constrained(points, out_dir),
        probes_figure.probes(runs, out_dir),
    ]
    figs += icl_report.figures(runs, out_dir)  # the ICL lab ([] without ICL-lab runs)
    return figs


def _fit_rows(baselines) -> list[dict]:
    """One fits.csv row per (metric, baseline family, form)."""
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
    return fit_rows


def _missing(all_runs, load_problems, figs, baselines, refit_failure, ft) -> list[str]:
    """What is missing: unfinished runs, their problems, undrawn figures, failed fits."""
    missing: list[str] = list(load_problems)
    for r in all_runs:
        if not r.finished:
            missing.append(f"run {r.name}: {r.progress()}")
    for r in all_runs:
        missing += [f"run {r.name}: {p}" for p in r.problems if "file missing" not in p]
    for fig in figs:
        missing += [f"figure {fig.name}: {note}" for note in fig.notes]
    missing += _fit_failures(baselines)
    if not any(baselines.values()):
        missing.append("effective sizes: no finished unique-data (f = 0) baseline runs")
    if refit_failure:
        missing.append(f"data-constrained refit: {refit_failure}")
    missing += ft.missing
    # Files absent in otherwise existing runs (e.g. a run without data_plan.json).
    for r in all_runs:
        if r.config is not None:
            missing += [f"run {r.name}: {p}" for p in r.problems if "file missing" in p]
    return missing


def _fit_failures(baselines) -> list[str]:
    """One line per (family, reason): the offset-free failure implies the offset one."""
    fit_failures: dict[tuple, list[str]] = {}
    for key, fams in baselines.items():
        for fam, bf in fams.items():
            why = bf.failures.get(fits_lib.OFFSET_FREE) or bf.failures.get(fits_lib.OFFSET)
            if why:
                form = fits_lib.OFFSET_FREE if fits_lib.OFFSET_FREE in bf.failures else "offset"
                fit_failures.setdefault((fam[0], fam[1], form, why), []).append(key)
    return [
        f"baseline fit ({arch}, {objective}) of {', '.join(keys)}: no {form} fit, {why}"
        for (arch, objective, form, why), keys in fit_failures.items()
    ]


def _header_lines(title: str, all_runs, n_finished: int) -> list[str]:
    """The title and the one-paragraph census of the run directories."""
    return [
        f"# {title}",
        "",
        f"Generated {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')} "
        f"from {len(all_runs)} run directories: {n_finished} finished, "
        f"{sum(r.status == runs_lib.STATUS_TRAINING for r in all_runs)} still training, "
        f"{sum(r.status == runs_lib.STATUS_NOT_EVALUATED for r in all_runs)} not evaluated, "
        f"{sum(r.status == runs_lib.STATUS_MISSING for r in all_runs)} missing. "
        "Final metrics come only from finished runs; unfinished runs appear in the "
        "curves (dashed).",
    ]


def _missing_lines(missing: list[str]) -> list[str]:
    """## What is missing."""
    lines = ["## What is missing", ""]
    if missing:
        lines.append(
            "Runs not finished (every launched run directory is listed), files missing or "
            "corrupt, fits and figures that could not be made."
        )
        lines.append("")
        lines += [f"- {m}" for m in missing]
    else:
        lines.append("Nothing: every run is finished and every figure drawn.")
    return lines


def _runs_lines(rows: list[dict], all_runs) -> list[str]:
    """## Runs: one table row per pre-training run, then the settings changed on resume."""
    lines = ["## Runs", ""]
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
    resumed = [(r, e) for r in all_runs for e in r.resume_log]
    if resumed:
        lines += ["", "### Settings changed on resume (resume_log.jsonl)", ""]
        lines += _table(
            ["run", "from step", "changes (recorded -> new)"],
            [
                (
                    r.name,
                    e.get("step"),
                    "; ".join(f"{k}: {v[0]} -> {v[1]}" for k, v in e["changes"].items()),
                )
                for r, e in resumed
            ],
        )
    return lines


def _fits_lines(fit_rows: list[dict], refit, refit_failure: str | None) -> list[str]:
    """## Fits: the baseline power laws, then the data-constrained law."""
    return [
        "## Fits",
        "",
        *_power_law_lines(fit_rows),
        "",
        *_data_constrained_lines(refit, refit_failure),
    ]


def _power_law_lines(fit_rows: list[dict]) -> list[str]:
    """### Power laws on the unique-data baselines."""
    lines = ["### Power laws on the unique-data baselines", ""]
    lines.append(
        "L(N) = E0 + (Nc/N)^alpha (`offset`) and (Nc/N)^alpha (`offset_free`), fitted on "
        "ln L with a robust soft-L1 loss; N = parameter count used by the report. "
        "Effective sizes invert the `offset` fit (the `offset_free` one when the former "
        f"failed). For reference, Kaplan et al.: {fits_lib.KAPLAN.describe()} "
        "(non-embedding parameters, WebText2)."
    )
    lines.append("")
    if not fit_rows:
        return lines + ["No baseline fits (see What is missing)."]
    return lines + _table(
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


def _data_constrained_lines(refit, refit_failure: str | None) -> list[str]:
    """### Data-constrained law: the published constants and the refit."""
    lines = ["### Data-constrained law (Muennighoff et al. 2023)", ""]
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
    return lines


def _figures_lines(figs: list[plotting.Figure]) -> list[str]:
    """## Figures: each figure with its caption and CSVs, then the fits CSV."""
    lines = ["## Figures", ""]
    for fig in figs:
        lines += [f"### {fig.title}", "", *_figure_lines(fig)]
    lines.append("Fit parameters: [fits.csv](fits.csv).")
    return lines


def _figure_lines(fig: plotting.Figure) -> list[str]:
    lines = [fig.caption, ""]
    if fig.png:
        lines += [f"![{fig.title}]({fig.png})", ""]
    for note in fig.notes:
        lines += [f"*Not drawn: {note}.*", ""]
    lines += ["Data: " + ", ".join(f"[{c}]({c})" for c in fig.csvs) + ".", ""]
    return lines


def finetune_lines(ft: finetune.FinetuneReport) -> list[str]:
    """The Markdown section on fine-tuned runs (Hernandez and Xue comparisons)."""
    return [
        *_finetune_runs_lines(ft),
        "",
        *_finetune_effective_lines(ft),
        "",
        *_xue_downstream_lines(ft),
    ]


def _finetune_runs_lines(ft: finetune.FinetuneReport) -> list[str]:
    """## Fine-tuning: the table of fine-tuned and from-scratch runs, then their figures."""
    lines = ["## Fine-tuning after repeated pre-training", ""]
    lines.append(
        "Runs started from another run's checkpoint (`--config.init_from`, recorded in "
        "`init_from.json`) on new data, next to runs trained from scratch on the same data. "
        "Fine-tuning tokens and losses are the fine-tuning run's own (its held-out split)."
    )
    lines.append("")
    rows = []
    for g in ft.groups:
        for r in sorted(g.members, key=finetune._order):
            source = os.path.basename(os.path.normpath(r.source_path)) if r.source_path else "—"
            init = f"{source} @ {r.source_step}" if r.source_step is not None else source
            rows.append(
                (g.label, r.name, r.model, r.params, r.pretrain_setting, init, r.status)
                + (r.final("test_loss"), r.best("test_loss"))
            )
    lines += _table(
        ["data", "run", "model", "N", "pre-training", "init from (step)", "status"]
        + ["final test loss", "best test loss"],
        rows,
    )
    for fig in ft.figures:
        lines += ["", f"### {fig.title}", ""] + _figure_lines(fig)[:-1]
    return lines


def _finetune_effective_lines(ft: finetune.FinetuneReport) -> list[str]:
    """### Effective model size after fine-tuning (Hernandez et al.)."""
    lines = ["### Effective model size after fine-tuning", ""]
    lines.append(
        "Final test loss of each finished fine-tuned run as a ratio to the from-scratch run "
        "of the same model and to the same model fine-tuned from its unique-data (f = 0) "
        "pre-training (> 1: worse). N_eff / N inverts the power law L(N) of `fits.py` "
        "fitted on the final losses of the from-scratch runs (or of the runs fine-tuned from "
        "f = 0) against parameters: the size of such a run that reaches the same loss "
        "(Hernandez et al.: pre-training at the degradation peak leaves fewer effective "
        "parameters than training from scratch). It needs >= 2 model sizes of a baseline; "
        "with one size only the ratios are given."
    )
    lines.append("")
    if ft.effective:
        lines += _table(
            ["data", "run", "pre-training", "final loss", "/ scratch", "/ f=0 FT"]
            + ["N_eff/N (scratch)", "N_eff/N (f=0 FT)"],
            [
                (
                    os.path.basename(row["data"]),
                    row["run"],
                    row["pretrain_setting"],
                    row["final_test_loss"],
                    row["ratio_vs_scratch"],
                    row["ratio_vs_unique_ft"],
                    row["scratch_multiplier"],
                    row["unique_ft_multiplier"],
                )
                for row in ft.effective
            ],
        )
    else:
        lines.append("No fine-tuned run yet.")
    sizes = {(row["data"], row["params"]) for row in ft.effective if row["params"]}
    if ft.effective and len(sizes) <= len({row["data"] for row in ft.effective}):
        lines += ["", "*A single model size per fine-tuning data set: no N_eff / N, "
                  "loss ratios only.*"]  # fmt: skip
    lines += ["", "Data: [finetune_effective.csv](finetune_effective.csv)."]
    return lines


def _xue_downstream_lines(ft: finetune.FinetuneReport) -> list[str]:
    """### Downstream results vs pre-training repetition (Xue et al.)."""
    lines = ["### Downstream results vs pre-training repetition (Xue et al. layout)", ""]
    lines.append(
        "Rows: the pre-training data of each fine-tuned run (f, E and distinct tokens of "
        "the source run; *from scratch* = no pre-training). *Held-out acc.* is the "
        "pre-training run's held-out token accuracy (C4 validation for C4 pre-training) "
        "at the checkpoint fine-tuning started from (else its last evaluated one). "
        "Downstream exact match / F1 (fractions) of the fine-tuned run at its *final* "
        "checkpoint, and at its *best* checkpoint (highest EM, step given)."
    )
    lines.append("")
    has_downstream = any(
        row[k] is not None for row in ft.downstream for k in ("final_em", "best_em")
    )
    lines += _table(
        ["run", "pre-training", "f", "E", "unique tokens", "held-out acc. (step)"]
        + ["final EM", "final F1", "best EM (step)", "best F1"],
        [
            (
                row["run"],
                row["pretrain_run"],
                row["pretrain_fraction"],
                row["pretrain_epochs"],
                row["pretrain_unique_tokens"],
                _with_step(row["pretrain_test_accuracy"], row["pretrain_step"]),
                row["final_em"],
                row["final_f1"],
                _with_step(row["best_em"], row["best_step"]),
                row["best_f1"],
            )
            for row in ft.downstream
        ],
    )
    if not has_downstream:
        lines += ["", "*No downstream_em / downstream_f1 in any result: the fine-tuning "
                  "data is not a downstream task store, or it is not evaluated yet.*"]  # fmt: skip
    lines += ["", "Data: [xue_downstream.csv](xue_downstream.csv)."]
    return lines


def _with_step(value: float | None, step: int | None) -> str:
    return "—" if value is None else f"{_fmt(value)} ({step})"
