"""The ICL lab's report figure: in-context accuracy vs training step, clamped vs not.

For every run whose evaluator records carry ``icl_accuracy`` (stores prepared from an
``icl_bursty`` source, :mod:`repeat_scaling.eval.icl`), one line of ICL accuracy on novel
classes against the training step, labelled with the run's attention clamps
(``config.interventions``), with its transition step (first step from which the
accuracy stays above 0.9, :func:`transition_step`) marked by a
dashed vertical line, and the in-context chance level (1 / number of context classes)
as a dotted horizontal line. A second panel shows the flipped-label, unseen-class and
in-weights accuracies. The points go to ``icl_transition.csv``.
"""

from __future__ import annotations

import numpy as np

from repeat_scaling.report.plotting import Figure, _grid, _save, run_label

THRESHOLD = 0.9
OTHER = (
    ("icl_flipped_accuracy", "flipped labels", "--"),
    ("icl_unseen_accuracy", "unseen classes", "-."),
    ("iwl_accuracy", "in-weights", ":"),
)
KEYS = ("icl_accuracy", "icl_accuracy_unclamped") + tuple(k for k, _, _ in OTHER)


def transition_step(
    steps: list[int] | np.ndarray, accuracy: list[float] | np.ndarray, threshold: float = 0.9
) -> int | None:
    """First step whose accuracy exceeds ``threshold`` and stays above it after (or None)."""
    steps = np.asarray(steps)
    acc = np.asarray(accuracy, np.float64)
    order = np.argsort(steps)
    steps, acc = steps[order], acc[order]
    above = acc > threshold
    for i in range(len(steps)):
        if above[i:].all():
            return int(steps[i])
    return None


def clamp_label(run) -> str:
    """``"no clamp"`` or e.g. ``"clamp previous_token L0H0"`` from the run's config.

    A malformed entry (not a dict, missing kind/layer/head, non-integer values) is
    labelled ``"(unreadable)"`` so a bad record never stops the report.
    """
    specs = (run.config or {}).get("interventions") or ()
    if not specs:
        return "no clamp"
    if not isinstance(specs, (list, tuple)):
        return "clamp (unreadable)"
    parts = []
    for s in specs:
        try:
            start, end = int(s.get("start_step", 0)), int(s.get("end_step", -1))
            window = f" [{start}, {end})" if start or end != -1 else ""
            parts.append(f"{s['kind']} L{int(s['layer'])}H{int(s['head'])}{window}")
        except (AttributeError, KeyError, TypeError, ValueError):
            parts.append("(unreadable)")
    return "clamp " + ", ".join(parts)


def _icl_runs(runs) -> list:
    return [
        r
        for r in runs
        if r.config is not None and any(row.get("icl_accuracy") is not None for row in r.results)
    ]


def icl_transition(runs, out_dir: str) -> Figure:
    """ICL accuracy vs step per run (transition marked), plus the other ICL accuracies."""
    fig_info = Figure(
        "icl_transition",
        "In-context learning: the abrupt transition, with and without clamping",
        "Accuracy of the label prediction at the query on novel classes (in-context "
        "learning, Chan et al. 2022; Reddy 2023) against training steps; dashed vertical "
        f"lines mark each run's transition step (accuracy > {THRESHOLD} from there on); "
        "the dotted line is the in-context chance level (one of the labels present in the "
        "context). Clamping a layer-0 head to perfect previous-token attention moves the "
        "transition earlier. Right: flipped-label, unseen-class and in-weights accuracy.",
    )
    header = ["run", "clamp", "step", "metric", "value", "transition_step"]
    rows: list[dict] = []
    runs = _icl_runs(runs)
    if not runs:
        fig_info.notes.append("no run has ICL-lab results (icl_accuracy)")
        return fig_info
    fig, (ax, ax2) = _grid(2, ncols=2, size=(6.0, 4.0))
    chance = None
    for r in runs:
        pts = sorted(
            (int(row["step"]), row) for row in r.results if row.get("icl_accuracy") is not None
        )
        steps = [s for s, _ in pts]
        acc = [float(row["icl_accuracy"]) for _, row in pts]
        t = transition_step(steps, acc, THRESHOLD)
        label = f"{clamp_label(r)} ({run_label(r, runs)})"
        if t is not None:
            label += f": transition at step {t}"
        (line,) = ax.plot(steps, acc, "-", marker=".", label=label)
        if t is not None:
            ax.axvline(t, color=line.get_color(), linestyle="--", linewidth=1)
        for s, row in pts:
            chance = row.get("icl_context_chance", chance)
            for key in KEYS:
                if row.get(key) is not None:
                    rows.append(
                        {
                            "run": r.name,
                            "clamp": clamp_label(r),
                            "step": s,
                            "metric": key,
                            "value": float(row[key]),
                            "transition_step": t,
                        }
                    )
        for key, what, style in OTHER:
            xs = [s for s, row in pts if row.get(key) is not None]
            ys = [float(row[key]) for _, row in pts if row.get(key) is not None]
            if xs:
                ax2.plot(xs, ys, style, color=line.get_color(), label=f"{clamp_label(r)}: {what}")
    if chance is not None:
        for a in (ax, ax2):
            a.axhline(float(chance), color="grey", linestyle=":", linewidth=1)
    ax.axhline(THRESHOLD, color="grey", linestyle="-", linewidth=0.5)
    ax.set_title("ICL accuracy on novel classes")
    ax2.set_title("other ICL-lab accuracies")
    for a in (ax, ax2):
        a.set_xlabel("training step")
        a.set_ylabel("accuracy at the query")
        a.set_ylim(-0.02, 1.02)
        a.legend(fontsize=6)
    fig_info.png = _save(fig, out_dir, fig_info.name)
    fig_info.write_points(out_dir, header, rows)
    fig_info.n_points = len(rows)
    return fig_info


def figures(runs, out_dir: str) -> list[Figure]:
    """The ICL lab's figures for the report (``[]`` when no run is an ICL-lab run)."""
    if not _icl_runs(runs):
        return []
    return [icl_transition(runs, out_dir)]
