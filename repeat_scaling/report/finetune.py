"""Fine-tuning after repeated pre-training: the Hernandez and Xue comparisons.

A *fine-tuned run* is a run directory with ``init_from.json`` (the trainer's
``--config.init_from``): it started from another run's checkpoint, with a fresh
optimizer and step counter, on new data. Its *from-scratch* companions are the runs on
the same fine-tuning data (same ``data.store``) without ``init_from`` that are not
themselves the source of a fine-tuned run. Together they form one *fine-tuning group*
per fine-tuning data set; every other run is a pre-training run and goes through the
main report unchanged.

Three products (units: tokens are the fine-tuning run's own ``tokens_seen``, i.e.
fine-tuning tokens only; losses are nats/token on the fine-tuning data's held-out split;
accuracies and EM/F1 are fractions in [0, 1]):

- ``finetune_curves.png/.csv`` (Hernandez et al. 2022, fine-tuning on Python): test loss
  on the fine-tuning data vs fine-tuning tokens, one panel per (fine-tuning data,
  model), one curve per pre-training repetition setting (read from the source run's
  ``data`` block in ``init_from.json``) plus the from-scratch run(s), dashed black.
- ``finetune_effective.csv`` and a Markdown table: each finished fine-tuned run's final
  loss as a ratio to the from-scratch run and to the run fine-tuned from the unique
  (f = 0) pre-training of the same model, and, when at least two model sizes of a
  baseline exist, as an effective-size multiplier N_eff / N: the size of a baseline run
  (from scratch, or fine-tuned from f = 0) reaching the same loss, from the power law
  of ``fits.py`` fitted on the baselines' final losses vs parameters.
- ``xue_downstream.csv`` and a Markdown table (Xue et al. 2023 layout): per fine-tuned
  (and from-scratch) run, the pre-training data (f, E, distinct tokens), the pre-training
  run's held-out accuracy at the checkpoint fine-tuning started from (its C4 validation
  accuracy when pre-trained on C4), and the fine-tuned run's downstream exact match / F1
  (``downstream_em`` / ``downstream_f1`` in its results) at its FINAL checkpoint and at
  its BEST checkpoint (highest EM; the step is given).

Partial data never raises: unfinished runs are drawn dashed and left out of the final
numbers, absent metrics are blank cells, and every gap is listed in ``missing``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

from repeat_scaling.report import fits as fits_lib
from repeat_scaling.report import plotting
from repeat_scaling.report import runs as runs_lib

TEST_LOSS = next(m for m in fits_lib.METRICS if m.key == "test_loss")
SCRATCH = "from scratch"

CURVES_HEADER = ["data", "model", "params", "run", "role", "pretrain_run", "pretrain_setting"]
CURVES_HEADER += ["pretrain_fraction", "pretrain_epochs", "init_step", "status", "step"]
CURVES_HEADER += ["tokens_seen", "test_loss"]

EFFECTIVE_HEADER = ["data", "run", "model", "params", "pretrain_setting", "pretrain_fraction"]
EFFECTIVE_HEADER += ["pretrain_epochs", "status", "final_test_loss", "scratch_loss"]
EFFECTIVE_HEADER += ["ratio_vs_scratch", "unique_ft_loss", "ratio_vs_unique_ft"]
EFFECTIVE_HEADER += ["scratch_effective_params", "scratch_multiplier"]
EFFECTIVE_HEADER += ["unique_ft_effective_params", "unique_ft_multiplier"]

XUE_HEADER = ["data", "run", "model", "pretrain_run", "pretrain_fraction", "pretrain_epochs"]
XUE_HEADER += ["pretrain_unique_tokens", "pretrain_step", "pretrain_test_accuracy"]
XUE_HEADER += ["pretrain_test_loss", "status", "final_step", "final_em", "final_f1"]
XUE_HEADER += ["final_accuracy", "best_step", "best_em", "best_f1"]


@dataclasses.dataclass
class Group:
    """One fine-tuning data set: its fine-tuned runs and from-scratch runs."""

    data: str
    finetuned: list[runs_lib.Run]
    scratch: list[runs_lib.Run]

    @property
    def members(self) -> list[runs_lib.Run]:
        return self.finetuned + self.scratch

    @property
    def label(self) -> str:
        return os.path.basename(self.data) or self.data


@dataclasses.dataclass
class FinetuneReport:
    """Everything the fine-tuning analysis produced for ``markdown.write_report``."""

    pretrain_runs: list[runs_lib.Run]
    groups: list[Group]
    figures: list[plotting.Figure] = dataclasses.field(default_factory=list)
    lines: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    effective: list[dict] = dataclasses.field(default_factory=list)
    downstream: list[dict] = dataclasses.field(default_factory=list)


def _abs(path: str | None) -> str | None:
    return os.path.normpath(os.path.abspath(path)) if path else None


def split_runs(runs: Sequence[runs_lib.Run]) -> tuple[list[runs_lib.Run], list[Group]]:
    """(pre-training runs, fine-tuning groups); see the module docstring for the rule."""
    loaded = [r for r in runs if r.config is not None]
    finetuned = [r for r in loaded if r.init_from]
    sources = {_abs(r.source_path) for r in finetuned}
    keys = sorted({r.data_key for r in finetuned})
    groups = []
    in_group: set[int] = set()
    for key in keys:
        ft = [r for r in finetuned if r.data_key == key]
        scratch = [
            r
            for r in loaded
            if not r.init_from and r.data_key == key and _abs(r.path) not in sources
        ]
        in_group.update(id(r) for r in ft + scratch)
        groups.append(Group(key, ft, scratch))
    pretrain = [r for r in runs if id(r) not in in_group]
    return pretrain, groups


def _source_run(run: runs_lib.Run, by_path: dict, param_key: str) -> runs_lib.Run | None:
    """The pre-training run a fine-tuned run started from (loaded from disk if needed)."""
    path = _abs(run.source_path)
    if path is None or (run.init_from or {}).get("kind") == "huggingface":
        return None
    if path not in by_path:
        by_path[path] = (
            runs_lib.load_run(path, param_key=param_key) if os.path.isdir(path) else None
        )
    return by_path[path]


def _at_step(
    run: runs_lib.Run | None, key: str, step: int | None
) -> tuple[int | None, float | None]:
    """(step, metric) at the latest step at or before ``step`` that has ``key``.

    A later checkpoint is never used (it is another model), so with no such row, or an
    unknown ``step``, the answer is ``(None, None)``.
    """
    if run is None or step is None:
        return None, None
    rows = [r for r in run.results if runs_lib._finite(r.get(key)) is not None]
    rows = [r for r in rows if int(r["step"]) <= step]
    if not rows:
        return None, None
    row = max(rows, key=lambda r: int(r["step"]))
    return int(row["step"]), runs_lib._finite(row.get(key))


def _order(run: runs_lib.Run) -> tuple:
    """Sort key: by model size, fine-tuned runs (by f, E) before from-scratch ones."""
    return (
        run.params or 0.0,
        run.model,
        run.init_from is None,
        run.pretrain_fraction if run.pretrain_fraction is not None else -1.0,
        run.pretrain_epochs or 0.0,
        run.name,
    )


# --------------------------------------------------------------------------------------
def curves(groups: Sequence[Group], out_dir: str) -> plotting.Figure:
    """Test loss on the fine-tuning data vs fine-tuning tokens (the Hernandez figure)."""
    fig_info = plotting.Figure(
        "finetune_curves",
        "Fine-tuned vs from scratch on the new data",
        "Held-out test loss on the fine-tuning data against fine-tuning tokens, one panel "
        "per fine-tuning data set and model, one line per pre-training repetition setting "
        "(source run's f and E) and the from-scratch run(s) in dashed black. Hernandez et "
        "al. fine-tune a model pre-trained at the degradation peak on Python code and find "
        "it still has fewer effective parameters than a model trained from scratch on "
        "that data. Unfinished runs are dotted.",
    )
    rows: list[dict] = []
    panels = []
    for g in groups:
        for model in plotting._sorted_models(g.members):
            members = sorted((r for r in g.members if r.model == model), key=_order)
            if any(r.curve("test_loss")[1] for r in members):
                panels.append((g, model, members))
    if not panels:
        fig_info.notes.append("no fine-tuned or from-scratch run has test-loss results yet")
        fig_info.write_points(out_dir, CURVES_HEADER, rows)
        return fig_info
    # One colour per pre-training setting across every panel, in (f, E) order.
    settings = sorted({(_order(r)[3:5], r.pretrain_setting) for g in groups for r in g.finetuned})
    colours = {label: f"C{k % 10}" for k, (_, label) in enumerate(settings)}
    fig, axes = plotting._grid(len(panels), ncols=2)
    for ax, (g, model, members) in zip(axes, panels):
        log_x = True
        for r in members:
            xs, ys = r.curve("test_loss")
            steps = [row["step"] for row in r.results if plotting._ok(row.get("test_loss"))]
            source = os.path.basename(os.path.normpath(r.source_path)) if r.source_path else ""
            for s, x, y in zip(steps, xs, ys):
                rows.append(
                    {
                        "data": g.data,
                        "model": model,
                        "params": r.params,
                        "run": r.name,
                        "role": "finetuned" if r.init_from else "scratch",
                        "pretrain_run": source,
                        "pretrain_setting": r.pretrain_setting,
                        "pretrain_fraction": r.pretrain_fraction,
                        "pretrain_epochs": r.pretrain_epochs,
                        "init_step": r.source_step,
                        "status": r.status,
                        "step": s,
                        "tokens_seen": x,
                        "test_loss": y,
                    }
                )
            if not xs:
                continue
            log_x = log_x and min(xs) > 0
            if r.init_from:
                style, colour = ("-" if r.finished else ":"), colours[r.pretrain_setting]
                label = f"pre-trained {r.pretrain_setting}"
            else:
                style, colour, label = ("--" if r.finished else ":"), "k", SCRATCH
            if not r.finished:
                label += " (training)"
            ax.plot(xs, ys, style, marker=".", color=colour, label=label)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel("fine-tuning tokens seen")
        ax.set_ylabel("test loss on the fine-tuning data (nats/token)")
        ax.set_title(f"{g.label}: {model}")
        ax.legend(fontsize=7)
    fig_info.png = plotting._save(fig, out_dir, fig_info.name)
    fig_info.write_points(out_dir, CURVES_HEADER, rows)
    fig_info.n_points = len(rows)
    return fig_info


# --------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _baseline(points: list[tuple[float, float, str]], family: tuple) -> fits_lib.BaselineFit | None:
    """Power-law fit of (N, final loss, run) points; None with fewer than 2 sizes."""
    if len({p[0] for p in points}) < 2:
        return None
    return fits_lib.fit_baseline(TEST_LOSS, family, points)


def _multiplier(fit: fits_lib.BaselineFit | None, loss: float | None, n: float | None):
    if fit is None or loss is None or not n:
        return None, None
    n_eff = fit.effective_params(loss)
    if n_eff is None or not math.isfinite(n_eff):
        return None, None
    return n_eff, n_eff / n


def effective_rows(groups: Sequence[Group]) -> tuple[list[dict], list[str]]:
    """Per finished fine-tuned run: loss ratios and effective-size multipliers.

    Baselines, per fine-tuning data set and family (arch, objective, fine-tuning token
    budget): the finished from-scratch runs, and the finished runs fine-tuned from a
    unique-data (f = 0) pre-training. Returns (rows, notes on what could not be done).
    """
    rows, notes = [], []
    for g in groups:
        families: dict[tuple, list[runs_lib.Run]] = {}
        for r in g.members:
            families.setdefault(fits_lib.family_of(r), []).append(r)
        for family, members in sorted(families.items(), key=str):
            scratch = [r for r in members if not r.init_from and r.finished]
            unique_ft = [r for r in members if r.init_from and r.pretrain_fraction == 0]
            unique_ft = [r for r in unique_ft if r.finished]
            fits = {}
            for name, base in (("scratch", scratch), ("unique_ft", unique_ft)):
                pts = [(r.params, r.final("test_loss"), r.name) for r in base]
                pts = [p for p in pts if p[0] and p[1] is not None]
                fits[name] = _baseline(pts, family)
                sizes = len({p[0] for p in pts})
                what = SCRATCH if name == "scratch" else "fine-tuned from f = 0"
                if sizes == 1:
                    notes.append(
                        f"{g.label} ({family[0]}, {family[1]}): one model size {what}, so no "
                        "effective-size fit; loss ratios are reported instead"
                    )
                elif fits[name] is not None and fits[name].best is None:
                    why = "; ".join(sorted(set(fits[name].failures.values())))
                    notes.append(f"{g.label}: power-law fit on the runs {what} failed: {why}")
            for r in sorted(members, key=_order):
                if not r.init_from:
                    continue
                loss = r.final("test_loss")
                s_loss = _mean([x.final("test_loss") for x in scratch if x.model == r.model])
                u_loss = _mean([x.final("test_loss") for x in unique_ft if x.model == r.model])
                s_eff, s_mult = _multiplier(fits["scratch"], loss, r.params)
                u_eff, u_mult = _multiplier(fits["unique_ft"], loss, r.params)
                rows.append(
                    {
                        "data": g.data,
                        "run": r.name,
                        "model": r.model,
                        "params": r.params,
                        "pretrain_setting": r.pretrain_setting,
                        "pretrain_fraction": r.pretrain_fraction,
                        "pretrain_epochs": r.pretrain_epochs,
                        "status": r.status,
                        "final_test_loss": loss,
                        "scratch_loss": s_loss,
                        "ratio_vs_scratch": loss / s_loss if loss and s_loss else None,
                        "unique_ft_loss": u_loss,
                        "ratio_vs_unique_ft": loss / u_loss if loss and u_loss else None,
                        "scratch_effective_params": s_eff,
                        "scratch_multiplier": s_mult,
                        "unique_ft_effective_params": u_eff,
                        "unique_ft_multiplier": u_mult,
                    }
                )
            if not scratch:
                notes.append(f"{g.label} ({family[0]}, {family[1]}): no finished from-scratch run")
    return rows, notes


# --------------------------------------------------------------------------------------
def downstream_rows(
    groups: Sequence[Group], all_runs: Sequence[runs_lib.Run], param_key: str
) -> tuple[list[dict], list[str]]:
    """The Xue et al. table: pre-training data, its held-out accuracy, downstream EM/F1.

    The pre-training accuracy and loss are those of the latest evaluation of the source
    run at or before the step fine-tuning started from (never a later checkpoint).
    Returns (rows, notes on blank or earlier-step pre-training cells).
    """
    by_path = {_abs(r.path): r for r in all_runs}
    rows, notes = [], []
    for g in groups:
        for r in sorted(g.members, key=_order):
            src = _source_run(r, by_path, param_key)
            src_step, src_acc = _at_step(src, "test_accuracy", r.source_step)
            _, src_loss = _at_step(src, "test_loss", src_step or r.source_step)
            if src is not None and src_step is None:
                at = "an unknown step" if r.source_step is None else f"step {r.source_step}"
                notes.append(
                    f"run {r.name}: pre-training run {src.name} has no test_accuracy at or "
                    f"before {at} (the checkpoint fine-tuned from); its accuracy is left blank"
                )
            elif src is not None and src_step != r.source_step:
                notes.append(
                    f"run {r.name}: pre-training run {src.name} was not evaluated at step "
                    f"{r.source_step}; its accuracy is from the earlier step {src_step}"
                )
            final_step = r.steps if r.finished else None
            best = [
                row for row in r.results if runs_lib._finite(row.get("downstream_em")) is not None
            ]
            best_row = max(
                best, key=lambda row: (float(row["downstream_em"]), -row["step"]), default=None
            )
            rows.append(
                {
                    "data": g.data,
                    "run": r.name,
                    "model": r.model,
                    "pretrain_run": src.name
                    if src
                    else (r.pretrain_setting if r.init_from else SCRATCH),
                    "pretrain_fraction": r.pretrain_fraction,
                    "pretrain_epochs": r.pretrain_epochs,
                    "pretrain_unique_tokens": src.unique_tokens if src else None,
                    "pretrain_step": src_step,
                    "pretrain_test_accuracy": src_acc,
                    "pretrain_test_loss": src_loss,
                    "status": r.status,
                    "final_step": final_step,
                    "final_em": r.final("downstream_em"),
                    "final_f1": r.final("downstream_f1"),
                    "final_accuracy": r.final("downstream_accuracy"),
                    "best_step": int(best_row["step"]) if best_row else None,
                    "best_em": runs_lib._finite(best_row.get("downstream_em"))
                    if best_row
                    else None,
                    "best_f1": runs_lib._finite(best_row.get("downstream_f1"))
                    if best_row
                    else None,
                }
            )
    return rows, notes


# --------------------------------------------------------------------------------------
def analyse(
    runs: Sequence[runs_lib.Run], out_dir: str, param_key: str = "non_embedding"
) -> FinetuneReport:
    """Split off the fine-tuning groups and write their figure and CSVs into ``out_dir``.

    With no fine-tuned run among ``runs`` nothing is written and ``groups`` is empty.
    """
    pretrain, groups = split_runs(runs)
    report = FinetuneReport(pretrain_runs=pretrain, groups=groups)
    if not groups:
        return report
    fig = curves(groups, out_dir)
    report.figures.append(fig)
    report.missing += [f"figure {fig.name}: {note}" for note in fig.notes]
    report.effective, notes = effective_rows(groups)
    report.missing += [f"fine-tuning effective size: {note}" for note in notes]
    plotting.write_csv(
        os.path.join(out_dir, "finetune_effective.csv"), EFFECTIVE_HEADER, report.effective
    )
    report.downstream, notes = downstream_rows(groups, runs, param_key)
    report.missing += [f"Xue table: {note}" for note in notes]
    plotting.write_csv(os.path.join(out_dir, "xue_downstream.csv"), XUE_HEADER, report.downstream)
    for g in groups:
        for r in g.finetuned:
            kind = (r.init_from or {}).get("kind")
            path = r.source_path
            if kind != "huggingface" and path and not os.path.isdir(path):
                report.missing.append(
                    f"run {r.name}: pre-training run {path} not found (its accuracy and "
                    "unique tokens are left blank)"
                )
    return report
