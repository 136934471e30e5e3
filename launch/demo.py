r"""`make demo`: prepare -> a small repetition sweep -> evaluator -> report, on this machine.

    python launch/demo.py [--out=demo_out] [--parallel=1]

1. runs the sweep of `configs/demo.py:sweep` with the local backend (each trainer
   prepares the built-in corpus store on first use; each run's evaluator goes over
   its checkpoints once training ends), under `OUT/runs/`;
2. aggregates the runs into `OUT/report/report.md` (figures, CSVs, fits);
3. prints the report path and a three-line summary from `double_descent.csv`.

Re-running resumes: finished runs are skipped, unfinished ones continue from their last
checkpoint. Any failing stage stops the demo with its exit code and a one-line reason.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _stage(title: str, cmd: list[str]) -> None:
    print(f"\n==> {title}\n    {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    code = subprocess.call(cmd, cwd=REPO_ROOT)
    if code != 0:
        sys.exit(f"demo: stage '{title}' failed with exit code {code}")
    print(f"    ({time.monotonic() - start:.0f} s)", flush=True)


def _summary(report_dir: pathlib.Path) -> list[str]:
    """Three lines: the unique baseline, the worst repeated run, the T5 run."""
    with open(report_dir / "double_descent.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("final_test_loss")]
    if not rows:
        return ["no finished run has a final test loss (see report.md: What is missing)"]

    def loss(r: dict) -> float:
        return float(r["final_test_loss"])

    def describe(r: dict) -> str:
        f = float(r["repeated_fraction"]) * 100
        return (
            f"{r['model']} f={f:g}% E={int(float(r['repeated_epochs']))}: test loss {loss(r):.4f}"
        )

    lines = []
    dec = [r for r in rows if not r["model"].startswith("t5")]
    base = [r for r in dec if float(r["repeated_fraction"]) == 0.0]
    rep = [r for r in dec if float(r["repeated_fraction"]) > 0.0]
    if base:
        lines.append(f"baseline (no repetition)  {describe(base[0])}")
    if rep:
        worst = max(rep, key=loss)
        delta = f" ({loss(worst) / loss(base[0]):.3f}x the baseline)" if base else ""
        lines.append(f"worst repeated run        {describe(worst)}{delta}")
    t5 = [r for r in rows if r["model"].startswith("t5")]
    if t5:
        lines.append(f"T5 span corruption        {describe(t5[0])}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output directory")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once")
    args = parser.parse_args()
    out = (REPO_ROOT / args.out).resolve()
    runs, report = out / "runs", out / "report"
    python = sys.executable
    start = time.monotonic()
    _stage(
        "train and evaluate the demo sweep (configs/demo.py:sweep)",
        [
            python,
            "launch/submit.py",
            "--config=configs/demo.py:sweep",
            "--backend=local",
            f"--root={runs}",
            f"--parallel={args.parallel}",
            "--eval_mode=after",
        ],
    )
    _stage("sweep status", [python, "launch/status.py", f"--root={runs}"])
    _stage(
        "report",
        [python, "-m", "repeat_scaling.report", f"--runs={runs}/*", f"--out={report}"],
    )
    print(f"\ndemo finished in {time.monotonic() - start:.0f} s")
    print(f"report: {report / 'report.md'}")
    for line in _summary(report):
        print(f"  {line}")


if __name__ == "__main__":
    main()
