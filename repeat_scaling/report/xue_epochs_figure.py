"""Xue et al.'s figure: final test metric against epochs over the whole training data at a
fixed token budget (f = 1 runs, with unique-data runs at E = 1), per objective and per
regularisation setting.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repeat_scaling.data.repetition import effective_epochs  # noqa: E402
from repeat_scaling.report.plotting import Figure, _log_x_plain, _save  # noqa: E402


def xue_epochs(rows: list[dict], out_dir: str) -> Figure:
    """Xue et al.: final metric vs epochs at fixed total tokens, per objective and per
    regularisation setting. Uses f = 1 runs (all data repeated) and f = 0 runs at E = 1."""
    fig_info = Figure(
        "xue_epochs",
        "Multi-epoch degradation at fixed tokens (Xue et al.)",
        "Final test metric against the number of epochs over the (whole) training data at "
        "a fixed token budget: f = 1 runs at their E, unique-data runs at E = 1. Left: per "
        "objective (MLM vs UL2, no regularisation); right: per regularisation setting "
        "(dropout, DropPath, label smoothing, MoE, ParamShare).",
    )
    header = ["panel", "group", "run", "model", "objective", "regularisation"]
    header += ["total_tokens", "epochs", "metric", "value"]
    out_rows = []
    pool = [
        row
        for row in rows
        if row["final_test_loss"] is not None and row["repeated_fraction"] in (0.0, 1.0)
    ]
    # Unique-data runs are the E = 1 point of an f = 1 family only: never plot the f = 0
    # runs of other families (another model kind, length or batch) as E = 1.
    repeated_families = {row["family"] for row in pool if row["repeated_fraction"] == 1.0}
    pool = [row for row in pool if row["family"] in repeated_families]
    metrics = [("final_test_loss", "final test loss (nats/token)")]
    if any(row["final_test_accuracy"] is not None for row in pool):
        metrics.append(("final_test_accuracy", "final test accuracy"))
    objectives = len({row["objective"] for row in pool}) > 1
    panels = [
        ("objective", lambda row: row["regularisation"] == "none", lambda row: row["objective"]),
        (
            "regularisation",
            lambda row: True,
            lambda row: (
                f"{row['objective']}, {row['regularisation']}"
                if objectives
                else row["regularisation"]
            ),
        ),
    ]
    if not any(row["repeated_fraction"] == 1.0 for row in pool):
        fig_info.notes.append("no finished run with all data repeated (repeated_fraction = 1)")
        fig_info.write_points(out_dir, header, out_rows)
        return fig_info
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.8 * len(metrics)), squeeze=False)
    for i, (mkey, ylabel) in enumerate(metrics):
        for j, (panel, keep, group_of) in enumerate(panels):
            ax = axes[i][j]
            groups: dict[str, list] = {}
            for row in pool:
                if not keep(row) or row[mkey] is None:
                    continue
                epochs = effective_epochs(row["repeated_fraction"], row["repeated_epochs"])
                group = f"{row['model']}, {group_of(row)}"
                groups.setdefault(group, []).append((epochs, row[mkey]))
                out_rows.append(
                    {
                        "panel": panel,
                        "group": group,
                        "run": row["run"],
                        "model": row["model"],
                        "objective": row["objective"],
                        "regularisation": row["regularisation"],
                        "total_tokens": row["total_tokens"],
                        "epochs": epochs,
                        "metric": mkey,
                        "value": row[mkey],
                    }
                )
            for group, pts in sorted(groups.items()):
                e, v = zip(*sorted(pts))
                ax.plot(e, v, "-o", label=group)
            _log_x_plain(ax)
            ax.set_xlabel("epochs over the training data")
            ax.set_ylabel(ylabel)
            ax.set_title(f"per {panel}")
            if ax.lines:
                ax.legend(fontsize=7)
    fig_info.png = _save(fig, out_dir, fig_info.name)
    fig_info.write_points(out_dir, header, out_rows)
    fig_info.n_points = len(out_rows)
    return fig_info
