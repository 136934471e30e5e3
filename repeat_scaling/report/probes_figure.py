"""The probes figure: interpretability probe scores (prefix matching, previous token,
copying, in-context learning, ...) of every run against training tokens seen.
"""

from __future__ import annotations

from repeat_scaling.report.plotting import (
    Figure,
    _evaluated,
    _grid,
    _ok,
    _save,
    colour,
    run_label,
)

PROBES = (
    ("prefix_matching", "prefix-matching score (max over heads)"),
    ("previous_token", "previous-token score (max over heads)"),
    ("copying_score", "copying score (max over heads)"),
    ("icl_score", "in-context-learning score (nats)"),
    ("random_repeat_loss", "repeated-random-tokens loss (nats/token)"),
    ("cross_prefix_matching", "cross-attention prefix-matching score (T5)"),
)


def probes(runs, out_dir: str) -> Figure:
    """Probe scores (prefix matching, previous token, copying, ICL) over training."""
    fig_info = Figure(
        "probes",
        "Interpretability probes over training",
        "Per-run probe scores (Olsson et al. definitions, max over heads) against tokens "
        "seen: induction (prefix-matching) heads weaken under heavy repetition "
        "(Hernandez et al.). Chance levels differ between probe layouts (T5 runs probe a "
        "shorter decoder sequence), so compare a score only within one model family.",
    )
    header = ["run", "model", "setting", "status", "step", "tokens_seen", "metric", "value"]
    rows = []
    runs = _evaluated(runs)
    present = [(k, label) for k, label in PROBES if any(r.curve(k)[1] for r in runs)]
    positions = {tuple(row["icl_positions"]) for r in runs for row in r.results
                 if isinstance(row.get("icl_positions"), list) and len(row["icl_positions"]) == 2}  # fmt: skip
    if any(k == "icl_score" for k, _ in present):
        if len(positions) == 1:
            early, late = next(iter(positions))
            fig_info.caption += f" ICL score = loss at token {late} minus loss at token {early}."
        else:
            fig_info.caption += (
                " ICL score = loss at a late token minus loss at an early token (the "
                "positions differ between runs: icl_positions in results.jsonl)."
            )
    if present:
        fig, axes = _grid(len(present), ncols=2)
        for ax, (key, label) in zip(axes, present):
            for r in runs:
                xs, ys = r.curve(key)
                if not xs:
                    continue
                steps = [row["step"] for row in r.results if _ok(row.get(key))]
                for s, x, y in zip(steps, xs, ys):
                    rows.append(
                        {
                            "run": r.name,
                            "model": r.model,
                            "setting": r.setting,
                            "status": r.status,
                            "step": s,
                            "tokens_seen": x,
                            "metric": key,
                            "value": y,
                        }
                    )
                ax.plot(xs, ys, "-" if r.finished else "--", marker=".", label=run_label(r, runs),
                        color=colour(runs.index(r), len(runs)))  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel("training tokens seen")
            ax.set_ylabel(label)
            ax.set_title(key.replace("_", " "))
            ax.legend(fontsize=6)
        fig_info.png = _save(fig, out_dir, fig_info.name)
    else:
        fig_info.notes.append("no probe scores in any results file (probes not run)")
    fig_info.write_points(out_dir, header, rows)
    fig_info.n_points = len(rows)
    return fig_info
