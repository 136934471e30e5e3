"""Evaluate a run's checkpoints: ``python -m repeat_scaling.evaluate --workdir=DIR``.

Flags:
  --workdir        the training run directory (config.json, checkpoints/).
  --watch          keep polling for new checkpoints until the run's final step
                   (config train.steps) is evaluated.
  --eval_config    evaluator settings: a JSON file, a JSON object, or ``key=value,...``
                   (keys of ``repeat_scaling.eval.settings.EvalSettings``).
  --num_devices    devices of the evaluator's data-parallel mesh (0 = all local devices).
  --poll_seconds   --watch polling interval; --watch_timeout_seconds gives up (0 = never).

Downstream (runs on a text-to-text "pairs" store, see repeat_scaling/eval/downstream.py):
  --downstream_examples          first N validation examples decoded and scored
                                 (default 256; 0 = skip downstream evaluation).
  --downstream_batch_size        rows per greedy-decoding batch (default 32).
  --downstream_max_decode_length generated tokens (0 = the store's targets_length).
  --downstream_split             the store split scored (default validation).
  --downstream_use_cache         KV-cache decoding (default true; false = reference path).
The same keys (``downstream_examples=64``) are also accepted in --eval_config; a flag
given on the command line wins.

Appends one line per checkpoint to ``DIR/eval/results.jsonl`` and skips steps already
there. Exit status 0 on success; 1 with a one-line ``error: ...`` on bad input (no
workdir, no checkpoint, a checkpoint of another model config, bad --eval_config).
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags, logging

from repeat_scaling import cli, compilation_cache
from repeat_scaling.errors import first_line

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory to evaluate.")
flags.DEFINE_bool("watch", False, "Follow a live run until its final step is evaluated.")
flags.DEFINE_string("eval_config", "", "JSON file / JSON object / key=value,... settings.")
flags.DEFINE_integer("num_devices", 0, "Devices of the evaluation mesh (0 = all).")
flags.DEFINE_float("poll_seconds", 10.0, "Polling interval of --watch (seconds).")
flags.DEFINE_float("watch_timeout_seconds", 0.0, "Give up --watch after this long (0 = never).")
flags.DEFINE_integer("downstream_examples", 256, "Downstream examples scored (0 = skip).")
flags.DEFINE_integer("downstream_batch_size", 32, "Rows per greedy-decoding batch.")
flags.DEFINE_integer("downstream_max_decode_length", 0, "Generated tokens (0 = targets_length).")
flags.DEFINE_string("downstream_split", "validation", "Store split of the downstream examples.")
flags.DEFINE_bool("downstream_use_cache", True, "KV-cache greedy decoding.")

DOWNSTREAM_FLAGS = (
    "downstream_examples",
    "downstream_batch_size",
    "downstream_max_decode_length",
    "downstream_split",
    "downstream_use_cache",
)


def parse_eval_config(text: str) -> dict:
    """``--eval_config`` as a dict: a JSON file path, a JSON object, or ``k=v,k=v``."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--eval_config is not valid JSON ({e.msg})") from None
    elif text.endswith(".json") or pathlib.Path(text).is_file():
        path = pathlib.Path(text)
        if not path.is_file():
            raise ValueError(f"--eval_config={text!r}: no such file")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--eval_config file {text!r} is not valid JSON ({e.msg})") from None
    else:
        d = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--eval_config item {item!r}; expected key=value")
            d[key.strip()] = value.strip()
    if not isinstance(d, dict):
        raise ValueError(f"--eval_config must be a JSON object, got {type(d).__name__}")
    return d


def split_settings(d: dict) -> tuple[dict, dict]:
    """``--eval_config`` keys -> (EvalSettings overrides, DownstreamSettings overrides)."""
    down = {k: v for k, v in d.items() if k.startswith("downstream_")}
    return {k: v for k, v in d.items() if k not in down}, down


def main(argv: list[str]) -> None:
    cli.quiet_library_logs()
    compilation_cache.configure()  # before anything compiles
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}")
    if not FLAGS.workdir:
        cli.fail("--workdir is required (a training run directory)")
    from repeat_scaling import workdir_io

    try:  # a local path or gs://BUCKET/PATH; other URL schemes are refused here
        workdir_io.check_workdir(FLAGS.workdir)
    except workdir_io.WorkdirError as e:
        cli.fail(str(e))
    from repeat_scaling.data.repetition import RepetitionPlanError
    from repeat_scaling.data.store import StoreError
    from repeat_scaling.eval import downstream, evaluator, probes
    from repeat_scaling.eval.results import ResultsLockedError
    from repeat_scaling.eval.settings import EvalSettings
    from repeat_scaling.models.cpu_attention import CpuAttentionError
    from repeat_scaling.train.checkpointing import CheckpointError

    try:
        given = parse_eval_config(FLAGS.eval_config)
        if FLAGS.watch:  # a live run may not have written its config yet
            evaluator.wait_for_run(FLAGS.workdir, FLAGS.poll_seconds, FLAGS.watch_timeout_seconds)
        # The run's own config.eval first, then --eval_config on top.
        overrides, down = split_settings({**evaluator.recorded_settings(FLAGS.workdir), **given})
        settings = EvalSettings.from_overrides(overrides)
        for name in DOWNSTREAM_FLAGS:
            if FLAGS[name].present or name not in down:
                down[name] = FLAGS[name].value
        down_settings = downstream.DownstreamSettings.from_overrides(down)
        ev = evaluator.Evaluator(
            FLAGS.workdir,
            settings,
            mesh=evaluator.eval_mesh(FLAGS.num_devices),
            downstream_settings=down_settings,
        )
        records = ev.run_all(
            watch=FLAGS.watch,
            poll_seconds=FLAGS.poll_seconds,
            timeout_seconds=FLAGS.watch_timeout_seconds,
        )
    except (
        ValueError,  # EvalError, ProbeError, StoreError, VocabError, plan and batcher errors
        CheckpointError,
        ResultsLockedError,
        StoreError,
        RepetitionPlanError,
        probes.ProbeError,
        CpuAttentionError,
    ) as e:
        cli.fail(first_line(e))
    logging.info("evaluated %d checkpoint(s)", len(records))
    done = sorted(ev.writer.done_steps)
    print(
        f"evaluated {len(records)} checkpoint(s); {len(done)} step(s) in "
        f"{ev.writer.path} (latest {done[-1] if done else None})",
        file=sys.stderr,
    )


def run() -> None:
    """Console script ``repeat-scaling-evaluate``."""
    from repeat_scaling import host_malloc

    host_malloc.configure()  # before jax starts XLA's thread pools
    app.run(main)


if __name__ == "__main__":
    run()
