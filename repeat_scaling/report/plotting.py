"""What every report figure shares: the ``Figure`` record (PNG + CSV of its points),
``write_csv``, legend labels, line colours, subplot grids, log axes and saving.

matplotlib with the Agg backend (no display needed). The figures themselves live in
``repetition_figures``, ``xue_epochs_figure``, ``data_constrained_figure`` and ``probes_figure``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from repeat_scaling.report import runs as runs_lib  # noqa: E402


@dataclasses.dataclass
class Figure:
    """What one figure function produced (paths relative to the output directory)."""

    name: str
    title: str
    caption: str
    png: str | None = None
    csvs: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    n_points: int = 0

    def write_points(self, out_dir: str, header: Sequence[str], rows: Sequence[dict]) -> None:
        """Write the plotted points to ``<name>.csv`` in ``out_dir`` and list that CSV."""
        write_csv(os.path.join(out_dir, f"{self.name}.csv"), header, rows)
        self.csvs.append(f"{self.name}.csv")


def write_csv(path: str, header: Sequence[str], rows: Sequence[dict]) -> None:
    """Write rows (dicts) with a fixed header; None becomes an empty cell."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(header), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in header})


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    if isinstance(value, float | np.floating):
        return f"{float(value):.10g}"
    return value


def run_label(run, runs) -> str:
    """Legend label: model and repetition setting, plus every other config key in which
    the run differs from the other runs of its model (e.g. a learning rate or a
    regulariser), and the seed when seeds differ."""
    peers = [r for r in runs if r.config is not None and r.model == run.model]
    label = runs_lib.family_label(run, runs_lib.ACROSS_REPETITION, peers)
    if len({r.objective for r in runs if r.config is not None}) == 1:
        label = label.replace(f", {run.objective}", "", 1)
    label += f", {run.setting}"
    if len({r.seed for r in peers}) > 1:
        label += f", seed {run.seed}"
    if not run.finished:
        label += " (training)"
    return label


def colour(i: int, n: int):
    """The i-th of n distinct line colours (tab10, tab20, then a continuous map)."""
    if n <= 10:
        return f"C{i}"
    if n <= 20:
        return plt.get_cmap("tab20")(i)
    return plt.get_cmap("turbo")(i / max(n - 1, 1))


def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (5.0, 3.8)):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False
    )
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _log_x_plain(ax) -> None:
    """Log-scale x axis with plain-number tick labels (0.1, 1, 10, 100)."""
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _save(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{name}.png"


def _sorted_models(runs) -> list[str]:
    sizes: dict[str, float] = {}
    for r in runs:
        sizes[r.model] = r.params or 0.0
    return sorted(sizes, key=lambda m: (sizes[m], m))


def _evaluated(runs) -> list:
    return [r for r in runs if r.config is not None and r.results]


def _ok(value) -> bool:
    """True for a finite number (the same test ``Run.curve`` applies)."""
    number = _as_float(value)
    return number is not None and math.isfinite(number)


def _as_float(value):
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
