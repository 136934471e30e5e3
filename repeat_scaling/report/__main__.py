"""Report CLI: aggregate run directories into figures, CSVs and report.md.

    python -m repeat_scaling.report --runs='sweeps/hernandez/*' --out=report_dir

``--runs`` takes glob patterns (repeatable, or comma-separated); a plain path that does
not exist is reported as a missing run. Bad flags get a one-line error and exit 1.
"""

from __future__ import annotations

import os

# The report's linear algebra is on tiny matrices, where BLAS worker threads only cost
# (L-BFGS-B slows ~100x on a busy machine). Set before numpy/scipy load OpenBLAS.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from absl import app, flags  # noqa: E402

from repeat_scaling import cli  # noqa: E402
from repeat_scaling.errors import first_line  # noqa: E402
from repeat_scaling.report import markdown  # noqa: E402
from repeat_scaling.report import runs as runs_lib  # noqa: E402

_RUNS = flags.DEFINE_list(
    "runs", None, "Run directories or glob patterns (quote them), comma-separated."
)
_OUT = flags.DEFINE_string("out", None, "Output directory for report.md, *.png and *.csv.")
_PARAM_KEY = flags.DEFINE_enum(
    "param_count",
    "non_embedding",
    list(runs_lib.PARAM_KEYS),
    "Which derived.params count is the model size N in the fits.",
)
_TITLE = flags.DEFINE_string("title", "repeat_scaling report", "Report title.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise runs_lib.ReportError(f"unexpected arguments {argv[1:]}; use --runs and --out")
    if not _RUNS.value:
        raise runs_lib.ReportError("--runs is required (e.g. --runs='sweep/*')")
    if not _OUT.value:
        raise runs_lib.ReportError("--out is required (the report directory)")
    runs, problems = runs_lib.load_runs(_RUNS.value, param_key=_PARAM_KEY.value)
    if not runs:
        raise runs_lib.ReportError(f"--runs={','.join(_RUNS.value)} matches no run directory")
    summary = markdown.write_report(runs, problems, _OUT.value, title=_TITLE.value)
    drawn = sum(fig.png is not None for fig in summary.figures)
    print(
        f"wrote {summary.report_path}: {summary.n_runs} runs ({summary.n_finished} finished), "
        f"{drawn}/{len(summary.figures)} figures, {len(summary.missing)} missing items"
    )


def _main(argv: list[str]) -> None:
    try:
        main(argv)
    except (runs_lib.ReportError, OSError) as e:
        cli.fail(first_line(e))


def run() -> None:
    """Console-script entry point (repeat-scaling-report)."""
    app.run(_main)


if __name__ == "__main__":
    run()
