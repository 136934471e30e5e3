"""Backends that run a list of expanded runs: `local`, `tpu` (gcloud), `slurm` (sbatch).

Every backend gets the same `Submission` (what to run) and a list of `sweeps.Run`s
(where), and builds the same two command lines per run with `train_argv` and
`eval_argv`: the trainer (`python -m repeat_scaling.train --config=FILE:ARG
--workdir=ROOT/NAME --config.key=value ...`) and the evaluator (`python -m
repeat_scaling.evaluate --workdir=ROOT/NAME [--watch]`). Only where those run differs.

Evaluation modes (`--eval_mode`): `watch` starts the evaluator beside the trainer and
lets it follow the run; `after` runs one evaluator pass when the trainer has finished;
`none` runs no evaluator.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from collections.abc import Sequence

EVAL_MODES = ("watch", "after", "none")


class LaunchError(ValueError):
    """A launch that cannot proceed (bad flag, failed command); one clear line."""


@dataclasses.dataclass(frozen=True)
class Submission:
    """What every run of one `submit.py` call shares.

    Attributes:
      config_file: the config file as the runner sees it (absolute for `local`,
        relative to the repository root for remote backends).
      config_arg: the part after `:` in `--config=FILE:ARG` ('' when none).
      overrides: global `--config.key=value` flags, applied before each run's own.
      eval_flags: extra evaluator flags, e.g. ('--eval_config=test_batches=2',).
      python: the interpreter on the machine that runs the commands.
      eval_mode: one of EVAL_MODES.
      dry_run: print the commands instead of executing them.
    """

    config_file: str
    config_arg: str = ""
    overrides: tuple[str, ...] = ()
    eval_flags: tuple[str, ...] = ()
    python: str = sys.executable
    eval_mode: str = "watch"
    dry_run: bool = False

    def __post_init__(self):
        if self.eval_mode not in EVAL_MODES:
            raise LaunchError(f"--eval_mode={self.eval_mode!r}; expected one of {EVAL_MODES}")

    @property
    def config_spec(self) -> str:
        return f"{self.config_file}:{self.config_arg}" if self.config_arg else self.config_file


def train_argv(sub: Submission, run, python: str | None = None) -> list[str]:
    """The trainer's command line for `run` (a `sweeps.Run`)."""
    return [
        python or sub.python,
        "-m",
        "repeat_scaling.train",
        f"--config={sub.config_spec}",
        f"--workdir={run.workdir}",
        *sub.overrides,
        *run.override_flags(),
    ]


def eval_argv(sub: Submission, run, watch: bool, python: str | None = None) -> list[str]:
    """The evaluator's command line for `run`; `watch` follows a live run."""
    argv = [python or sub.python, "-m", "repeat_scaling.evaluate", f"--workdir={run.workdir}"]
    return argv + (["--watch"] if watch else []) + list(sub.eval_flags)


def shell_join(argv: Sequence[str]) -> str:
    """A command line as one shell-quoted string."""
    return " ".join(shlex.quote(a) for a in argv)
