"""Progress of every run under a sweep root, from workdir files only.

    python launch/status.py --root=DIR

prints one line per run directory (a directory holding `launch.json`, `config.json`
or `train/metrics.jsonl`):

    NAME  STATE  step/total  loss=...  eval=...  ETA

States: `pending` (nothing written yet), `training` (trainer alive or metrics still
growing), `stopped` (interrupted; re-submitting resumes), `failed` (a child exited
non-zero; see `logs/`), `trained` (final checkpoint written, evaluation missing),
`evaluating`, `done` (final step evaluated). The files read are the trainer's
(`config.json`, `train/metrics.jsonl`, `checkpoints/<step>/`), the evaluator's
(`eval/results.jsonl`) and the launcher's (`launch.json`). ETA comes from the
trainer's logged per-step time (`step_time_s`, seconds) or, failing that, from the
wall-clock timestamps of the logged steps.

ROOT may be a gs://BUCKET/PATH URL (read through `repeat_scaling.workdir_io`, gcsfs);
there a checkpoint counts once orbax has written its `commit_success.txt` marker.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from repeat_scaling import cli, run_files, workdir_io  # noqa: E402  (after the sys.path line)
from repeat_scaling.errors import first_line  # noqa: E402
from repeat_scaling.train.metrics import format_duration as format_eta  # noqa: E402

TIME_KEYS = ("time", "timestamp", "wall_time")


@dataclasses.dataclass
class RunStatus:
    """What the workdir files say about one run."""

    name: str
    state: str
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    eval_step: int | None = None
    test_loss: float | None = None
    eta_s: float | None = None
    checkpoint_steps: list[int] = dataclasses.field(default_factory=list)

    @property
    def trained(self) -> bool:
        """The trainer wrote its final checkpoint (or logged its final step)."""
        if self.total_steps is None:
            return False
        if self.total_steps in self.checkpoint_steps:
            return True
        return self.step is not None and self.step >= self.total_steps

    @property
    def evaluated(self) -> bool:
        """The evaluator has a result for the final step."""
        return self.total_steps is not None and self.eval_step == self.total_steps

    def line(self) -> str:
        """One human-readable status line."""
        step = "-" if self.step is None else str(self.step)
        total = "?" if self.total_steps is None else str(self.total_steps)
        loss = "-" if self.loss is None else f"{self.loss:.4f}"
        if self.test_loss is None:
            ev = "-"
        else:
            ev = f"{self.test_loss:.4f}@{self.eval_step}"
        return (
            f"{self.name:<32} {self.state:<10} {step + '/' + total:>15}  "
            f"loss={loss:<8} eval={ev:<14} eta={format_eta(self.eta_s)}"
        )


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; a torn or corrupt line is skipped."""
    return run_files.read_jsonl(path)[0]


def read_json(path: pathlib.Path) -> dict[str, Any]:
    """A JSON object file, or {} when missing or unreadable."""
    return run_files.read_json(path) or {}


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """Steps of committed orbax checkpoints (``train.checkpointing.committed_steps``)."""
    if not (workdir / run_files.CHECKPOINTS).is_dir():
        return []  # no orbax/JAX import for runs without checkpoints
    from repeat_scaling.train import checkpointing

    return checkpointing.committed_steps(workdir)


def pid_alive(pid: Any) -> bool:
    """Whether a local process with this id exists (and is not a zombie we reaped)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _total_steps(workdir: pathlib.Path, launch: dict[str, Any]) -> int | None:
    config = read_json(workdir / run_files.CONFIG)
    steps = config.get("train", {}).get("steps") if isinstance(config.get("train"), dict) else None
    if steps is None:
        steps = launch.get("total_steps")
    return int(steps) if steps is not None else None


def _eta(metrics: list[dict[str, Any]], total: int | None) -> float | None:
    if not metrics or total is None:
        return None
    last = metrics[-1]
    step = last.get("step")
    if not isinstance(step, int | float) or step >= total:
        return None if not isinstance(step, int | float) else 0.0
    remaining = total - step
    step_time = last.get("step_time_s", last.get("step_time"))
    if isinstance(step_time, int | float) and step_time > 0:
        return remaining * float(step_time)
    for key in TIME_KEYS:
        stamped = [m for m in metrics if isinstance(m.get(key), int | float) and "step" in m]
        if len(stamped) >= 2:
            first, final = stamped[0], stamped[-1]
            dsteps = final["step"] - first["step"]
            if dsteps > 0:
                return remaining * (final[key] - first[key]) / dsteps
    return None


def run_status(workdir: str | os.PathLike, total_steps: int | None = None) -> RunStatus:
    """Reads one run's workdir. `total_steps` overrides what the files say."""
    workdir = workdir_io.workdir_path(workdir, what="workdir")
    launch = read_json(workdir / run_files.LAUNCH)
    total = total_steps if total_steps is not None else _total_steps(workdir, launch)
    metrics = [m for m in read_jsonl(workdir / run_files.METRICS) if isinstance(m.get("step"), int)]
    results = [r for r in read_jsonl(workdir / run_files.RESULTS) if isinstance(r.get("step"), int)]
    status = RunStatus(name=workdir.name, state="pending", total_steps=total)
    status.checkpoint_steps = checkpoint_steps(workdir)
    if metrics:
        status.step = metrics[-1]["step"]
        loss = metrics[-1].get("loss")
        status.loss = float(loss) if isinstance(loss, int | float) else None
    if status.checkpoint_steps:
        status.step = max(status.step or 0, status.checkpoint_steps[-1])
    if results:
        latest = max(results, key=lambda r: r["step"])
        status.eval_step = latest["step"]
        test_loss = latest.get("test_loss")
        status.test_loss = float(test_loss) if isinstance(test_loss, int | float) else None

    alive = pid_alive(launch.get("train_pid")) or pid_alive(launch.get("eval_pid"))
    launch_state = launch.get("state")
    eval_mode = launch.get("eval_mode", "after")
    if status.evaluated or (status.trained and eval_mode == "none"):
        status.state = "done"
    elif launch_state == "running" and alive:
        status.state = "evaluating" if status.trained else "training"
        status.eta_s = _eta(metrics, total)
    elif launch_state == "failed":
        status.state = "failed"
    elif status.trained:
        status.state = "trained"
    elif launch_state in ("running", "stopped") or metrics or status.checkpoint_steps:
        # A launcher that died without updating launch.json counts as stopped.
        status.state = "stopped"
    if status.state == "training" and status.eta_s is None:
        status.eta_s = _eta(metrics, total)
    return status


def is_run_dir(path: pathlib.Path) -> bool:
    """A directory that looks like a run workdir."""
    return path.is_dir() and any(
        (path / f).exists() for f in (run_files.LAUNCH, run_files.CONFIG, run_files.METRICS)
    )


def root_status(root: str | os.PathLike) -> list[RunStatus]:
    """Status of every run directory directly under `root`, sorted by name."""
    root = workdir_io.workdir_path(root, what="--root")
    if not root.is_dir():
        raise ValueError(f"--root={str(root)!r} is not a directory")
    return [run_status(p) for p in sorted(root.iterdir()) if is_run_dir(p)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the sweep root given to submit.py")
    args = parser.parse_args(argv)
    try:
        statuses = root_status(args.root)
    except ValueError as e:
        cli.print_error(first_line(e))
        return 1
    if not statuses:
        print(f"no runs under {args.root}")
        return 0
    for status in statuses:
        print(status.line())
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status.state] = counts.get(status.state, 0) + 1
    print(f"{len(statuses)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
