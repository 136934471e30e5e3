r"""Expand an experiment config's sweep into runs and submit them.

    python launch/submit.py --config=configs/hernandez2022.py:demo --backend=local \
        --root=/tmp/sweeps/hernandez [--dry_run] [--only='d*_f10_*'] [--parallel=2] \
        [--eval_mode=watch|after|none] [--config.train.steps=200 ...]

Each entry of `config.sweep` becomes one run named like `d25m_f10_e100_s0` (see
`repeat_scaling/sweeps.py`) with its workdir `ROOT/NAME`. Global `--config.key=value` flags
apply to every run (before the run's own overrides). Backends:

- `local`: subprocesses on this machine (`--parallel` runs at a time); Ctrl-C stops
  them cleanly (the trainers checkpoint); re-submitting skips finished runs and
  resumes unfinished ones.
- `tpu`: Cloud TPU VMs / pods via the gcloud CLI (`--tpu_*` flags; ROOT is a
  gs://BUCKET/PATH URL, which the trainer and evaluator read and write directly, or
  a path every worker shares). Every run is first compiled for the accelerator type
  on this machine (`repeat_scaling.compile`): a run that does not fit in HBM refuses
  the sweep before any VM exists (`--notpu_compile_check` skips the check).
- `slurm`: one sbatch script per run, submitted with sbatch (`--slurm_*` flags; ROOT
  on a shared file system).

`--dry_run` prints every command (and, for slurm, the scripts) instead of running it.
Errors are one line on stderr and exit code 1.
"""

from __future__ import annotations

import os
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch.backends import EVAL_MODES, LaunchError, Submission  # noqa: E402
from launch.backends.tpu import DEFAULT_PYTHON as TPU_PYTHON  # noqa: E402
from launch.backends.tpu import DEFAULT_SETUP as TPU_SETUP  # noqa: E402
from repeat_scaling import (  # noqa: E402
    cli,  # noqa: E402
    config_files,
    run_files,  # noqa: E402
    sweeps,
)
from repeat_scaling.errors import first_line  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file, `configs/x.py:arg`", lock_config=False
)
flags.DEFINE_enum("backend", "local", ["local", "tpu", "slurm"], "where the runs execute")
flags.DEFINE_string("root", None, "directory (or gs:// URL, tpu) holding one workdir per run")
flags.DEFINE_bool("dry_run", False, "print the commands instead of running them")
flags.DEFINE_string("only", "", "comma-separated globs over run names (default: all runs)")
flags.DEFINE_integer("parallel", 1, "runs at once (local and tpu backends)")
flags.DEFINE_enum("eval_mode", "watch", list(EVAL_MODES), "evaluator beside, after or never")
flags.DEFINE_multi_string(
    "eval_flag", [], "extra evaluator flag, repeatable: --eval_flag=--poll_seconds=60"
)
flags.DEFINE_string("python", "", "interpreter for the runs (default: this one; tpu: python3)")
flags.DEFINE_float("grace_s", 300.0, "local: seconds children get to save after SIGTERM")

flags.DEFINE_string("tpu_zone", "", "tpu: zone, e.g. us-central2-b")
flags.DEFINE_string("tpu_accelerator_type", "", "tpu: e.g. v4-32, v5litepod-64")
flags.DEFINE_string("tpu_runtime_version", "", "tpu: runtime image ('': the type's default)")
flags.DEFINE_string("tpu_project", "", "tpu: GCP project (default: gcloud's)")
flags.DEFINE_bool("tpu_spot", False, "tpu: spot capacity")
flags.DEFINE_bool("tpu_preemptible", False, "tpu: preemptible capacity (older TPU types)")
flags.DEFINE_bool("tpu_queued", False, "tpu: request nodes as queued resources")
flags.DEFINE_string("tpu_name_prefix", "rs", "tpu: prefix of node names")
flags.DEFINE_enum("tpu_eval_on", "worker0", ["worker0", "vm"], "tpu: where the evaluator runs")
flags.DEFINE_string("tpu_eval_accelerator_type", "v5litepod-1", "tpu: evaluator VM type")
flags.DEFINE_string("tpu_eval_zone", "", "tpu: evaluator VM zone ('': --tpu_zone)")
flags.DEFINE_string("tpu_eval_runtime_version", "", "tpu: evaluator VM runtime ('': its type's)")
flags.DEFINE_string("tpu_setup", TPU_SETUP, "tpu: install command (in the code directory)")
flags.DEFINE_string("tpu_setup_extra", "", "tpu: commands after the setup (copy the store)")
flags.DEFINE_bool("tpu_compile_check", True, "tpu: compile every run for the type here first")
flags.DEFINE_bool("tpu_keep_on_failure", False, "tpu: keep nodes of failed runs")
flags.DEFINE_string("tpu_log_dir", "launch_logs", "tpu: local directory for run logs")

flags.DEFINE_integer("slurm_nodes", 1, "slurm: nodes per run")
flags.DEFINE_integer("slurm_gpus_per_node", 8, "slurm: GPUs per node (0: a CPU job)")
flags.DEFINE_integer("slurm_tasks_per_node", 1, "slurm: tasks per node (1: all GPUs in one task)")
flags.DEFINE_integer("slurm_cpus_per_task", 0, "slurm: CPUs per task (0: default)")
flags.DEFINE_string("slurm_time", "24:00:00", "slurm: time limit")
flags.DEFINE_string("slurm_partition", "", "slurm: partition")
flags.DEFINE_string("slurm_account", "", "slurm: account")
flags.DEFINE_integer("slurm_eval_gpus", 1, "slurm: GPUs of the evaluator job (0: CPU)")
flags.DEFINE_integer("slurm_poll_seconds", 30, "slurm: watching evaluator's training-job check")
flags.DEFINE_multi_string("slurm_setup", [], "slurm: shell line before srun (repeatable)")

FLAGS = flags.FLAGS


def runner_config_path(path: str, backend: str) -> str:
    """The config file as the runner sees it: absolute on this machine's file system
    (local, and SLURM's shared one), repository-relative on TPU VMs (a copy of the repo)."""
    absolute = pathlib.Path(path).resolve()
    if not absolute.is_file():
        raise LaunchError(f"--config={path!r}: no such config file")
    if backend in ("local", "slurm"):
        return str(absolute)
    try:
        return str(absolute.relative_to(REPO_ROOT))
    except ValueError:
        raise LaunchError(
            f"--config={path!r} is outside the repository {REPO_ROOT}; remote backends "
            "copy only the repository, so put the config under configs/"
        ) from None


def build_backend(backend: str):
    """The backend object selected by the flags."""
    if backend == "local":
        from launch.backends.local import LocalBackend

        return LocalBackend(parallel=FLAGS.parallel, grace_s=FLAGS.grace_s)
    if backend == "tpu":
        from launch.backends.tpu import TpuBackend, TpuOptions

        options = TpuOptions(
            zone=FLAGS.tpu_zone,
            accelerator_type=FLAGS.tpu_accelerator_type,
            runtime_version=FLAGS.tpu_runtime_version,
            project=FLAGS.tpu_project,
            spot=FLAGS.tpu_spot,
            preemptible=FLAGS.tpu_preemptible,
            queued=FLAGS.tpu_queued,
            name_prefix=FLAGS.tpu_name_prefix,
            eval_on=FLAGS.tpu_eval_on,
            eval_accelerator_type=FLAGS.tpu_eval_accelerator_type,
            eval_zone=FLAGS.tpu_eval_zone,
            eval_runtime_version=FLAGS.tpu_eval_runtime_version,
            setup=FLAGS.tpu_setup,
            setup_extra=FLAGS.tpu_setup_extra,
            compile_check=FLAGS.tpu_compile_check,
            keep_on_failure=FLAGS.tpu_keep_on_failure,
            log_dir=FLAGS.tpu_log_dir,
        )
        return TpuBackend(options, parallel=FLAGS.parallel)
    from launch.backends.slurm import SlurmBackend, SlurmOptions

    return SlurmBackend(
        SlurmOptions(
            nodes=FLAGS.slurm_nodes,
            gpus_per_node=FLAGS.slurm_gpus_per_node,
            tasks_per_node=FLAGS.slurm_tasks_per_node,
            cpus_per_task=FLAGS.slurm_cpus_per_task,
            time=FLAGS.slurm_time,
            partition=FLAGS.slurm_partition,
            account=FLAGS.slurm_account,
            eval_gpus=FLAGS.slurm_eval_gpus,
            poll_seconds=FLAGS.slurm_poll_seconds,
            setup=tuple(FLAGS.slurm_setup),
        )
    )


def submit() -> int:
    """Runs the submission described by the flags; returns the exit code."""
    if _CONFIG.value is None:
        raise LaunchError("--config is required, e.g. --config=configs/hernandez2022.py:demo")
    if not FLAGS.root:
        raise LaunchError("--root is required: the directory (or gs:// URL) for the runs")
    root = FLAGS.root
    if "://" in root and not root.startswith("gs://"):
        raise LaunchError(f"--root={root!r}: expected a path or a gs://BUCKET/PATH URL")
    if root.startswith("gs://") and FLAGS.backend != "tpu":
        raise LaunchError(
            f"--root={root!r}: the {FLAGS.backend} backend needs a local or shared "
            "file-system path (gs:// roots are for --backend=tpu)"
        )
    if FLAGS.backend == "tpu" and not (root.startswith("gs://") or os.path.isabs(root)):
        raise LaunchError(
            f"--root={root!r}: the tpu backend needs a gs:// URL or an absolute path that "
            "every worker shares (e.g. a gcsfuse mount)"
        )
    if not root.startswith("gs://"):
        root = os.path.abspath(root)
    config_file, config_arg = config_files.split(config_flags.get_config_filename(FLAGS["config"]))
    raw = FLAGS["config"].serialize().partition("=")[2]
    config_arg = config_files.split(raw)[1] or config_arg or ""
    overrides = config_flags.get_override_values(FLAGS["config"])
    sub = Submission(
        config_file=runner_config_path(config_file, FLAGS.backend),
        config_arg=config_arg,
        overrides=tuple(
            f"--config.{k}={sweeps.format_flag_value(v)}" for k, v in overrides.items()
        ),
        eval_flags=tuple(FLAGS.eval_flag),
        python=FLAGS.python or (TPU_PYTHON if FLAGS.backend == "tpu" else sys.executable),
        eval_mode=FLAGS.eval_mode,
        dry_run=FLAGS.dry_run,
    )
    runs = sweeps.expand(_CONFIG.value, root, only=FLAGS.only or None, named=overrides)
    print(f"# {len(runs)} run(s) from {sub.config_spec} under {root} ({FLAGS.backend})")
    if not (FLAGS.dry_run and root.startswith("gs://")):  # a dry run reads no bucket
        refuse_differing_records(runs)
    return build_backend(FLAGS.backend).submit(sub, runs)


def refuse_differing_records(runs: list[sweeps.Run]) -> None:
    """A LaunchError (one line) when a run's workdir holds a trained run (a committed
    checkpoint and its ``config.json``) whose record differs from the run's resolved
    config in a key the trainer would refuse on resume (e.g. two sweeps from config files
    that differ outside the sweep, which give their runs the same names)."""
    from repeat_scaling import workdir_io
    from repeat_scaling.train import checkpointing, record
    from repeat_scaling.train import config as config_lib

    for run in runs:
        try:
            recorded = run_files.read_json(workdir_io.workdir_path(run.workdir) / run_files.CONFIG)
            if recorded is None or not checkpointing.committed_steps(run.workdir):
                continue
        except Exception as e:  # a bucket or file system that cannot be read
            raise LaunchError(
                f"run {run.name}: cannot read the record in {run.workdir}: {first_line(e)}"
            ) from None
        resolved = run.config.to_dict()
        resolved["model"] = config_lib.model_config(run.config).to_dict()
        recorded = record.effective_config(recorded, record.read_resume_log(run.workdir))
        refused = [
            d for d in record.differences(recorded, resolved) if not record.is_resumable(d[0])
        ]
        if refused:
            raise LaunchError(
                f"run {run.name}: {run.workdir} holds a run trained with another config "
                f"({record.describe(refused)}); submit this sweep under another --root"
            )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}")
    try:
        code = submit()
    except (LaunchError, sweeps.SweepError, ValueError) as e:
        cli.print_error(first_line(e))
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
