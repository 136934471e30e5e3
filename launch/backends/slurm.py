"""`slurm` backend: one sbatch script per run (plus one for its evaluator), submitted.

For each run it writes `ROOT/NAME/slurm/train.sbatch`: `nodes` nodes, one task per
node holding `gpus_per_node` GPUs, and `srun python -m repeat_scaling.train ...`;
inside, `jax.distributed.initialize()` finds the coordinator, process count and
process id from the SLURM environment, so the same command runs on 1 or 64 nodes.
`--signal=TERM@120` makes SLURM send SIGTERM two minutes before the time limit, so
the trainer saves a checkpoint; re-submitting resumes from it.

The evaluator gets `ROOT/NAME/slurm/eval.sbatch` (one node, `eval_gpus` GPUs),
submitted with `--dependency=after:<train job>` (`eval_mode=watch`: starts once the
trainer has started and follows it) or `afterok:<train job>` (`after`).

Submission is `sbatch --parsable SCRIPT` (the job id is read from its output); with
`dry_run` the scripts are still written, and printed with the sbatch commands as a
runnable shell snippet (`TRAIN_JOB_ID=$(sbatch --parsable ...)`). ROOT
must be on a file system the compute nodes share. Runs already evaluated at their
final step are skipped; trained but unevaluated runs get only the evaluator.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shlex
import subprocess
import sys
from typing import TextIO

from launch import status as status_lib
from launch.backends import LaunchError, Submission, eval_argv, shell_join, train_argv
from launch.backends.local import run_is_done

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """Flags of the slurm backend (see `submit.py --helpfull`)."""

    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 0  # 0: SLURM's default
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    eval_gpus: int = 1
    setup: tuple[str, ...] = ()  # shell lines run before srun (module load, venv...)
    repo: str = str(REPO_ROOT)

    def __post_init__(self):
        for field in ("nodes", "gpus_per_node", "eval_gpus"):
            if getattr(self, field) < 1:
                raise LaunchError(f"--slurm_{field}={getattr(self, field)}; expected an int >= 1")
        if self.cpus_per_task < 0:
            raise LaunchError(f"--slurm_cpus_per_task={self.cpus_per_task}; expected >= 0")


class SlurmBackend:
    """Writes and submits sbatch scripts (see the module docstring)."""

    def __init__(self, options: SlurmOptions, out: TextIO | None = None):
        self.opt = options
        self.out = out or sys.stdout

    def _header(self, job_name: str, nodes: int, gpus: int, log: str) -> list[str]:
        lines = [
            "#!/bin/bash",
            f"#SBATCH --job-name={job_name}",
            f"#SBATCH --nodes={nodes}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --gpus-per-node={gpus}",
        ]
        if self.opt.cpus_per_task:
            lines.append(f"#SBATCH --cpus-per-task={self.opt.cpus_per_task}")
        lines.append(f"#SBATCH --time={self.opt.time}")
        if self.opt.partition:
            lines.append(f"#SBATCH --partition={self.opt.partition}")
        if self.opt.account:
            lines.append(f"#SBATCH --account={self.opt.account}")
        lines += [
            "#SBATCH --signal=TERM@120",
            f"#SBATCH --output={log}",
            "set -euo pipefail",
            f"cd {self.opt.repo}",
            *self.opt.setup,
        ]
        return lines

    def train_script(self, sub: Submission, run) -> str:
        """The trainer's sbatch script for `run`."""
        log = f"{run.workdir}/logs/slurm-train-%j.out"
        lines = self._header(run.name, self.opt.nodes, self.opt.gpus_per_node, log)
        lines += [
            "# One task per node; jax.distributed.initialize() reads the SLURM environment.",
            f"srun --kill-on-bad-exit=1 {shell_join(train_argv(sub, run))}",
        ]
        return "\n".join(lines) + "\n"

    def eval_script(self, sub: Submission, run, watch: bool) -> str:
        """The evaluator's sbatch script for `run`."""
        log = f"{run.workdir}/logs/slurm-eval-%j.out"
        lines = self._header(f"{run.name}-eval", 1, self.opt.eval_gpus, log)
        if watch:
            lines.append("# The evaluator needs the trainer's config.json: wait for it.")
            lines.append(
                f"until [ -f {shlex.quote(run.workdir + '/config.json')} ]; do sleep 30; done"
            )
        lines.append(f"srun {shell_join(eval_argv(sub, run, watch=watch))}")
        return "\n".join(lines) + "\n"

    def _sbatch(self, script: pathlib.Path, dependency: str, dry_run: bool) -> str:
        """Submits `script` (after `dependency`, e.g. 'after:123'); returns the job id.

        A dry run prints a runnable shell line instead: `TRAIN_JOB_ID=$(sbatch ...)` for
        a job others depend on, and `--dependency=...:$TRAIN_JOB_ID` for those.
        """
        dep = [f"--dependency={dependency}"] if dependency else []
        cmd = ["sbatch", "--parsable", *dep, str(script)]
        if dry_run:
            line = " ".join(["sbatch", "--parsable", *dep, shlex.quote(str(script))])
            if not dependency:
                line = f"TRAIN_JOB_ID=$({line})"
            print(line, file=self.out, flush=True)
            return "$TRAIN_JOB_ID"
        print("+ " + shell_join(cmd), file=self.out, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise LaunchError(
                f"sbatch failed with exit code {proc.returncode}: {proc.stderr.strip()[:200]}"
            )
        job_id = proc.stdout.strip().split(";")[0]
        if not job_id:
            raise LaunchError(f"sbatch printed no job id for {script}")
        return job_id

    def submit(self, sub: Submission, runs: list) -> int:
        """Writes and submits the scripts of every unfinished run. Returns 0 or 1."""
        failed = 0
        for run in runs:
            if run.workdir.startswith("gs://"):
                raise LaunchError(f"--root={run.workdir!r}: slurm needs a shared file system path")
            st = status_lib.run_status(run.workdir, run.total_steps)
            if run_is_done(st, sub.eval_mode):
                print(f"# skip {run.name} (done)", file=self.out)
                continue
            directory = pathlib.Path(run.workdir) / "slurm"
            directory.mkdir(parents=True, exist_ok=True)
            (pathlib.Path(run.workdir) / "logs").mkdir(exist_ok=True)
            watch = sub.eval_mode == "watch"
            try:
                dependency = ""
                if not st.trained:
                    path = directory / "train.sbatch"
                    path.write_text(self.train_script(sub, run), encoding="utf-8")
                    if sub.dry_run:
                        print(f"# {path}\n{path.read_text()}", file=self.out, end="")
                    job = self._sbatch(path, "", sub.dry_run)
                    dependency = f"{'after' if watch else 'afterok'}:{job}"
                if sub.eval_mode != "none" or st.trained:
                    path = directory / "eval.sbatch"
                    path.write_text(self.eval_script(sub, run, watch and not st.trained))
                    if sub.dry_run:
                        print(f"# {path}\n{path.read_text()}", file=self.out, end="")
                    self._sbatch(path, dependency, sub.dry_run)
            except LaunchError as e:
                print(f"FAILED {run.name}: {e}", file=self.out)
                failed += 1
        return 1 if failed else 0
