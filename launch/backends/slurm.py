"""`slurm` backend: one sbatch script per run (plus one for its evaluator), submitted.

For each run it writes `ROOT/NAME/slurm/train.sbatch`: `nodes` nodes with
`tasks_per_node` tasks each (default 1: one task holding all `gpus_per_node` GPUs of its
node; `tasks_per_node=gpus_per_node`: one task per GPU) and `srun python -m
repeat_scaling.train ...`. Each task reads its process count, process id and GPUs from
the SLURM environment and passes them to `jax.distributed.initialize`
(`repeat_scaling/train/distributed.py`), so the same command uses every GPU of 1 or 64
nodes. `gpus_per_node=0` is a CPU job (`JAX_PLATFORMS=cpu`, gloo collectives); the
script is otherwise the same, which is how the tests run it on a real slurmctld.

Preemption: `--signal=TERM@120` makes SLURM send SIGTERM to the trainers two minutes
before the time limit (`scancel --signal=TERM JOB` does the same at any time); they
save a checkpoint and exit 143, and the script then runs `scontrol requeue` on its own
job (`--requeue`), which starts again and resumes from that checkpoint. A job that
SLURM preempts with PreemptMode=REQUEUE is requeued by SLURM itself.

The evaluator gets `ROOT/NAME/slurm/eval.sbatch` (one node, `eval_gpus` GPUs).
`eval_mode=watch`: submitted with `--dependency=after:<train job>` and the job id as its
argument; it follows the run with `evaluate --watch` while the training job is queued
or running (requeued included), checking it with `squeue` every `poll_seconds`, and once
that job has ended (completed, failed, cancelled) stops the watcher and makes one last
pass over the committed checkpoints. `after`: `--dependency=afterok:<train job>` and
`--kill-on-invalid-dep=yes`, so it is cancelled when the training job fails.

Submission is `sbatch --parsable SCRIPT` (the job id is read from its output); with
`dry_run` the scripts are still written, and printed with the sbatch commands as a
runnable shell snippet (`TRAIN_JOB_ID=$(sbatch --parsable ...)`). ROOT
must be on a file system the compute nodes share. Runs already evaluated at their
final step are skipped; trained but unevaluated runs get only the evaluator.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shlex
import subprocess
import sys
from typing import TextIO

from launch import status as status_lib
from launch.backends import LaunchError, Submission, eval_argv, shell_join, train_argv
from launch.backends.local import run_is_done

#: The trainer's exit status after saving on SIGTERM (repeat_scaling/train/__main__.py).
PREEMPTED_EXIT = 143

#: squeue states (%T) of a job that may still run: the watching evaluator keeps going.
ACTIVE_STATES = (
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
)


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """Flags of the slurm backend (see `submit.py --helpfull`)."""

    nodes: int = 1
    gpus_per_node: int = 8  # 0: a CPU job
    tasks_per_node: int = 1  # 1: one task with all GPUs of its node
    cpus_per_task: int = 0  # 0: SLURM's default
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    eval_gpus: int = 1  # 0: the evaluator on CPU
    poll_seconds: int = 30  # how often the watching evaluator job checks the training job
    setup: tuple[str, ...] = ()  # shell lines run before srun (module load, venv...)
    cwd: str = dataclasses.field(default_factory=os.getcwd)  # the jobs' directory

    def __post_init__(self):
        for field in ("nodes", "tasks_per_node", "poll_seconds"):
            if getattr(self, field) < 1:
                raise LaunchError(f"--slurm_{field}={getattr(self, field)}; expected an int >= 1")
        for field in ("gpus_per_node", "eval_gpus", "cpus_per_task"):
            if getattr(self, field) < 0:
                raise LaunchError(f"--slurm_{field}={getattr(self, field)}; expected an int >= 0")
        if self.gpus_per_node % self.tasks_per_node:
            raise LaunchError(
                f"--slurm_tasks_per_node={self.tasks_per_node} does not divide "
                f"--slurm_gpus_per_node={self.gpus_per_node}; expected each task to get "
                "the same number of GPUs"
            )


class SlurmBackend:
    """Writes and submits sbatch scripts (see the module docstring)."""

    def __init__(self, options: SlurmOptions, out: TextIO | None = None):
        self.opt = options
        self.out = out or sys.stdout

    def _header(self, job_name: str, nodes: int, tasks: int, gpus: int, log: str) -> list[str]:
        lines = [
            "#!/bin/bash",
            f"#SBATCH --job-name={job_name}",
            f"#SBATCH --nodes={nodes}",
            f"#SBATCH --ntasks-per-node={tasks}",
        ]
        if gpus:
            lines.append(f"#SBATCH --gpus-per-node={gpus}")
        if self.opt.cpus_per_task:
            lines.append(f"#SBATCH --cpus-per-task={self.opt.cpus_per_task}")
        lines.append(f"#SBATCH --time={self.opt.time}")
        if self.opt.partition:
            lines.append(f"#SBATCH --partition={self.opt.partition}")
        if self.opt.account:
            lines.append(f"#SBATCH --account={self.opt.account}")
        lines.append(f"#SBATCH --output={log}")
        return lines

    def _prologue(self, gpus: int) -> list[str]:
        lines = ["set -euo pipefail", f"cd {shlex.quote(self.opt.cwd)}", *self.opt.setup]
        if not gpus:
            lines.append("export JAX_PLATFORMS=cpu  # a CPU job (no GPUs asked for)")
        return lines

    def train_script(self, sub: Submission, run) -> str:
        """The trainer's sbatch script for `run`."""
        log = f"{run.workdir}/logs/slurm-train-%j.out"
        opt = self.opt
        lines = self._header(run.name, opt.nodes, opt.tasks_per_node, opt.gpus_per_node, log)
        lines += [
            "#SBATCH --signal=TERM@120",
            "#SBATCH --requeue",
            "#SBATCH --open-mode=append",
            *self._prologue(opt.gpus_per_node),
            "# Every task passes its process count, process id and GPUs (from the SLURM",
            "# environment) to jax.distributed.initialize.",
            "status=0",
            f"srun --kill-on-bad-exit=1 {shell_join(train_argv(sub, run))} || status=$?",
            f'if [ "$status" -eq {PREEMPTED_EXIT} ]; then',
            "  # SIGTERM (time limit near, scancel --signal=TERM): a checkpoint was saved;",
            "  # the requeued job resumes from it.",
            f'  echo "trainer preempted (exit {PREEMPTED_EXIT}): requeueing job $SLURM_JOB_ID" >&2',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi",
            'exit "$status"',
        ]
        return "\n".join(lines) + "\n"

    def eval_script(self, sub: Submission, run, watch: bool) -> str:
        """The evaluator's sbatch script for `run`; `watch` takes the training job id as $1."""
        log = f"{run.workdir}/logs/slurm-eval-%j.out"
        gpus = self.opt.eval_gpus
        lines = self._header(f"{run.name}-eval", 1, 1, gpus, log)
        if not watch:
            lines += ["#SBATCH --kill-on-invalid-dep=yes", *self._prologue(gpus)]
            lines.append(f"srun {shell_join(eval_argv(sub, run, watch=False))}")
            return "\n".join(lines) + "\n"
        active = "|".join(ACTIVE_STATES)
        lines += [
            *self._prologue(gpus),
            'train_job="${1:?usage: sbatch eval.sbatch TRAIN_JOB_ID}"',
            "# Follow the run while its training job is queued or running (requeued too);",
            "# once that job has ended, stop following and evaluate what was committed.",
            f"srun {shell_join(eval_argv(sub, run, watch=True))} &",
            "watcher=$!",
            "ended=",
            'while kill -0 "$watcher" 2>/dev/null; do',
            '  state=$(squeue --noheader --states=all --jobs="$train_job" --format=%T \\',
            "    2>/dev/null || true)",
            '  case "$state" in',
            f"    {active}) sleep {self.opt.poll_seconds} ;;",
            '    *) ended="${state:-gone}"; kill "$watcher" 2>/dev/null || true; break ;;',
            "  esac",
            "done",
            "status=0",
            'wait "$watcher" || status=$?',
            'if [ -n "$ended" ]; then',
            '  echo "training job $train_job ended ($ended): last evaluation pass" >&2',
            f"  exec srun {shell_join(eval_argv(sub, run, watch=False))}",
            "fi",
            'exit "$status"',
        ]
        return "\n".join(lines) + "\n"

    def _sbatch(
        self, script: pathlib.Path, dependency: str, dry_run: bool, args: tuple[str, ...] = ()
    ) -> str:
        """Submits `script` (after `dependency`, e.g. 'after:123'; `args` are the script's
        arguments); returns the job id.

        A dry run prints a runnable shell line instead: `TRAIN_JOB_ID=$(sbatch ...)` for
        a job others depend on, and `--dependency=...:$TRAIN_JOB_ID` for those.
        """
        dep = [f"--dependency={dependency}"] if dependency else []
        cmd = ["sbatch", "--parsable", *dep, str(script), *args]
        if dry_run:
            line = " ".join(["sbatch", "--parsable", *dep, shlex.quote(str(script)), *args])
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
        print(f"Submitted batch job {job_id}", file=self.out, flush=True)
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
                dependency, job = "", ""
                if not st.trained:
                    path = directory / "train.sbatch"
                    path.write_text(self.train_script(sub, run), encoding="utf-8")
                    if sub.dry_run:
                        print(f"# {path}\n{path.read_text()}", file=self.out, end="")
                    job = self._sbatch(path, "", sub.dry_run)
                    dependency = f"{'after' if watch else 'afterok'}:{job}"
                if sub.eval_mode != "none" or st.trained:
                    path = directory / "eval.sbatch"
                    follow = watch and not st.trained
                    path.write_text(self.eval_script(sub, run, follow), encoding="utf-8")
                    if sub.dry_run:
                        print(f"# {path}\n{path.read_text()}", file=self.out, end="")
                    self._sbatch(path, dependency, sub.dry_run, (job,) if follow else ())
            except LaunchError as e:
                print(f"FAILED {run.name}: {e}", file=self.out)
                failed += 1
        return 1 if failed else 0
