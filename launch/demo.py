r"""`make demo`: prepare -> a small repetition sweep -> evaluator -> report, on this machine.

    python launch/demo.py [--out=demo_out] [--parallel=1]

1. runs the sweep of `configs/demo.py:sweep` with the local backend (each trainer
   prepares the built-in corpus store on first use; each run's evaluator goes over
   its checkpoints once training ends), under `OUT/runs/`;
2. aggregates the runs into `OUT/report/report.md` (figures, CSVs, fits);
3. prints the report path and a three-line summary from the report's `findings.json`
   (the double-descent verdict and its peak, memorisation at the peak, the worst run).

Re-running resumes: finished runs are skipped, unfinished ones continue from their last
checkpoint. Any failing stage stops the demo with its exit code and a one-line reason.
The demo runs on the CPU (``JAX_PLATFORMS=cpu`` unless set): its numbers in the README
are CPU numbers, and the dev install's libtpu (for the TPU compile check) stays quiet.
"""

from __future__ import annotations

import argparse
import json
import os
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
    """Three lines from the report's findings.json: the double-descent verdict with its
    peak, the memorisation verdict, and the worst run against the baseline."""
    path = report_dir / "findings.json"
    if not path.is_file():
        return [f"no {path.name} (see report.md: What is missing)"]
    found = {f["kind"]: f for f in json.loads(path.read_text())["findings"]}
    dd, mem = found.get("double_descent"), found.get("memorisation")
    if dd is None:
        return ["no family of finished repeated runs (see report.md: What is missing)"]
    nums = dd["numbers"]
    lines = [f"double descent ({dd['family']}): {dd['verdict']}: {dd['statement']}"]
    if mem is not None:
        lines.append(f"memorisation at the peak: {mem['verdict']}: {mem['statement']}")
    if nums.get("baseline_loss") and nums.get("peak_loss"):
        lines.append(
            f"worst E = {nums['peak_epochs']:g}: test loss {nums['peak_loss']:.4f} vs "
            f"{nums['baseline_loss']:.4f} without repetition "
            f"({nums['peak_loss'] / nums['baseline_loss']:.3f}x)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output directory")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # inherited by every stage
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
