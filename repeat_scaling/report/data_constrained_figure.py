"""The data-constrained law's figure: final test loss predicted by Muennighoff et al.'s law
(published and refit constants, from ``data_constrained``) against the measured loss.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repeat_scaling.report.plotting import Figure, _save  # noqa: E402


def data_constrained(points: list[dict], out_dir: str) -> Figure:
    """Muennighoff et al. law, published and refit constants, predicted vs measured."""
    fig_info = Figure(
        "data_constrained",
        "Data-constrained scaling law: predicted vs measured",
        "Final test loss predicted by L = E + A/N'^alpha + B/D'^beta (Muennighoff et al.) "
        "against the measured value, with the published constants (trained on C4 with "
        "the GPT-2 tokenizer, so offsets are expected) and refit to these runs; the "
        "dashed diagonal is perfect prediction.",
    )
    header = ["run", "model", "params", "tokens", "unique_tokens", "measured_loss"]
    header += ["predicted_published", "predicted_refit"]
    fig_info.write_points(out_dir, header, points)
    if not points:
        fig_info.notes.append("no finished run with parameters, token counts and a test loss")
        return fig_info
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    measured = [p["measured_loss"] for p in points]
    ax.plot(measured, [p["predicted_published"] for p in points], "o", label="published")
    refit = [(p["measured_loss"], p["predicted_refit"]) for p in points if p["predicted_refit"]]
    if refit:
        ax.plot(*zip(*refit), "s", mfc="none", label="refit to these runs")
    values = measured + [p["predicted_published"] for p in points] + [v for _, v in refit]
    lo, hi = min(values), max(values)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel("measured final test loss (nats/token)")
    ax.set_ylabel("predicted loss (nats/token)")
    ax.set_title("data-constrained law")
    ax.legend(fontsize=8)
    fig_info.png = _save(fig, out_dir, fig_info.name)
    fig_info.n_points = len(points) + len(refit)
    return fig_info
