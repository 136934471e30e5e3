"""Train one run: ``python -m repeat_scaling.train --config=configs/x.py[:arg] --workdir=DIR``.

Overrides: ``--config.train.steps=100 --config.model.dropout_rate=0.1`` (any key of the
config; see ``repeat_scaling/train/config.py`` for the schema). Rerunning with the same
workdir resumes from the latest committed checkpoint.

Fine-tuning: ``--config.init_from=RUN_WORKDIR [--config.init_step=N]`` or
``--config.init_from=HF_T5_DIR`` starts a new run in ``--workdir`` from those parameters
(fresh optimizer and schedule; see ``repeat_scaling/train/init_from.py``).
Attention clamps: ``--config.interventions="({'kind': 'previous_token', 'layer': 0,
'head': 1, 'start_step': 0, 'end_step': 500},)"``.

Multi-host: ``--coordinator_address=host:port --num_processes=N --process_id=i`` on each
process (TPU pods and SLURM are detected without flags).

Exit status: 0 finished; 1 bad input or a run that stopped with an error (one line on
stderr); 143 preempted by SIGTERM after saving a checkpoint (rerun to resume).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from repeat_scaling import cli, compilation_cache
from repeat_scaling.errors import first_line

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/x.py[:arg]).")
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config.json).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")

PREEMPTED_EXIT = 143


def main(argv: list[str]) -> None:
    cli.quiet_library_logs()
    compilation_cache.configure()  # before anything compiles
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; use --config.KEY=VALUE to override the config")
    if FLAGS.config is None:
        cli.fail("--config is required (e.g. --config=configs/demo.py)")
    if not FLAGS.workdir:
        cli.fail("--workdir is required (the run directory)")
    from repeat_scaling import workdir_io

    try:  # a local path or gs://BUCKET/PATH; other URL schemes are refused here
        workdir_io.check_workdir(FLAGS.workdir)
    except workdir_io.WorkdirError as e:
        cli.fail(str(e))
    # Imports after flag parsing: jax must not start a backend before distributed init.
    from repeat_scaling.train import distributed

    try:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:
        cli.fail(str(e))

    from repeat_scaling.data.store import StoreError
    from repeat_scaling.models.cpu_attention import CpuAttentionError
    from repeat_scaling.train import checkpointing, loop
    from repeat_scaling.train.config import ConfigError

    try:
        summary = loop.train(FLAGS.config, FLAGS.workdir)
    except (
        ConfigError,
        StoreError,
        workdir_io.WorkdirError,
        checkpointing.CheckpointError,
        loop.NonFiniteLossError,
        CpuAttentionError,
    ) as e:
        cli.fail(first_line(e))
    except loop.Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT)
    last = summary.get("last_metrics") or {}
    loss = f"loss {last['loss']:.4f}" if last.get("loss") is not None else "no loss logged"
    resumed = summary["resumed_from"]
    done = summary["final_step"]
    how = "already trained, nothing to do" if resumed == done else f"resumed from {resumed}"
    print(
        f"done: step {summary['final_step']} ({how}), {loss} (step {last.get('step', '?')}), "
        f"workdir {FLAGS.workdir}",
        file=sys.stderr,
    )


def run() -> None:
    """Console script ``repeat-scaling-train``."""
    from repeat_scaling import host_malloc

    host_malloc.configure()  # before jax starts XLA's thread pools
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
