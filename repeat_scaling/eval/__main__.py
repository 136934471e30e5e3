"""Evaluate a run's checkpoints: ``python -m repeat_scaling.evaluate --workdir=DIR``.

Flags:
  --workdir        the training run directory (config.json, checkpoints/).
  --watch          keep polling for new checkpoints until the run's final step
                   (config train.steps) is evaluated.
  --eval_config    evaluator settings: a JSON file, a JSON object, or ``key=value,...``
                   (keys of ``repeat_scaling.eval.metrics.EvalSettings``).
  --num_devices    devices of the evaluator's data-parallel mesh (0 = all local devices).
  --poll_seconds   --watch polling interval; --watch_timeout_seconds gives up (0 = never).

Appends one line per checkpoint to ``DIR/eval/results.jsonl`` and skips steps already
there. Exit status 0 on success; 1 with a one-line ``error: ...`` on bad input (no
workdir, no checkpoint, a checkpoint of another model config, bad --eval_config).
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory to evaluate.")
flags.DEFINE_bool("watch", False, "Follow a live run until its final step is evaluated.")
flags.DEFINE_string("eval_config", "", "JSON file / JSON object / key=value,... settings.")
flags.DEFINE_integer("num_devices", 0, "Devices of the evaluation mesh (0 = all).")
flags.DEFINE_float("poll_seconds", 10.0, "Polling interval of --watch (seconds).")
flags.DEFINE_float("watch_timeout_seconds", 0.0, "Give up --watch after this long (0 = never).")


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


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    if not FLAGS.workdir:
        _fail("--workdir is required (a training run directory)")
    if "://" in FLAGS.workdir:
        _fail(
            f"--workdir={FLAGS.workdir!r} is a URL; expected a file-system path "
            "(mount a bucket with gcsfuse and pass the mount path)"
        )
    from repeat_scaling.data.repetition import RepetitionPlanError
    from repeat_scaling.data.store import StoreError
    from repeat_scaling.eval import evaluator, metrics, probes
    from repeat_scaling.eval.results import ResultsLockedError
    from repeat_scaling.train.checkpointing import CheckpointError

    try:
        settings = metrics.EvalSettings.from_overrides(parse_eval_config(FLAGS.eval_config))
        if FLAGS.watch:  # a live run may not have written its config yet
            evaluator.wait_for_run(FLAGS.workdir, FLAGS.poll_seconds, FLAGS.watch_timeout_seconds)
        ev = evaluator.Evaluator(
            FLAGS.workdir, settings, mesh=evaluator.eval_mesh(FLAGS.num_devices)
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
    ) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    logging.info("evaluated %d checkpoint(s)", len(records))
    done = sorted(ev.writer.done_steps)
    print(
        f"evaluated {len(records)} checkpoint(s); {len(done)} step(s) in "
        f"{ev.writer.path} (latest {done[-1] if done else None})",
        file=sys.stderr,
    )


def run() -> None:
    """Console script ``repeat-scaling-evaluate``."""
    app.run(main)


if __name__ == "__main__":
    run()
