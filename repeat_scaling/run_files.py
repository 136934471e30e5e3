"""The files of a run's workdir: their names and the readers of its JSON records.

Every module that writes or reads a run's workdir (trainer, checkpointing, evaluator,
report, launcher, status) names its files from here. Paths are relative to the workdir
and work with ``pathlib.Path`` and gs:// paths alike (``workdir / METRICS``).

| name | written by | content |
|---|---|---|
| ``config.json`` | trainer, once | the resolved config + ``derived`` facts |
| ``data_plan.json`` | trainer, once | the repetition plan's summary |
| ``init_from.json`` | trainer, once | the fine-tuning source |
| ``resume_log.jsonl`` | trainer | resumable keys changed on resume |
| ``train.lock`` | trainer | one trainer per workdir |
| ``train/metrics.jsonl`` | trainer | per logged step |
| ``train/eval.jsonl`` | trainer | the in-loop held-out evaluation |
| ``checkpoints/<step>`` | trainer | orbax checkpoints |
| ``checkpoints_corrupt/`` | trainer | checkpoints that failed verification |
| ``tensorboard/`` (``eval/`` inside) | trainer, evaluator | event files |
| ``eval/results.jsonl``, ``eval/errors.jsonl``, ``eval/results.lock`` | evaluator | |
| ``launch.json`` | launcher | state, pids, commands |
| ``comparison.json`` | in-context regression lab | trained model vs the GD construction |
| ``export.json`` (in an export directory) | ``repeat_scaling.export`` | |
"""

from __future__ import annotations

import json
from typing import Any

from repeat_scaling import workdir_io

CONFIG = "config.json"
DATA_PLAN = "data_plan.json"
INIT_FROM = "init_from.json"
RESUME_LOG = "resume_log.jsonl"
TRAIN_LOCK = "train.lock"
METRICS = "train/metrics.jsonl"
TRAIN_EVAL = "train/eval.jsonl"
CHECKPOINTS = "checkpoints"
CHECKPOINTS_CORRUPT = "checkpoints_corrupt"
TENSORBOARD = "tensorboard"
EVAL_DIR = "eval"
RESULTS = "eval/results.jsonl"
EVAL_ERRORS = "eval/errors.jsonl"
EVAL_LOCK = "eval/results.lock"
LAUNCH = "launch.json"
COMPARISON = "comparison.json"
EXPORT = "export.json"


def json_default(o: Any) -> Any:
    """What a record holds for a value JSON has no type for: numpy scalars and arrays as
    numbers and lists, anything else as its ``str``."""
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def write_json(path: Any, obj: Any) -> None:
    """A record written atomically (local temp + rename; one object upload on gs://)."""
    workdir_io.write_json_atomic(path, obj, default=json_default)


class RunFileError(ValueError):
    """A record that is missing or not a JSON object (one line naming the file)."""


def load_json(path: Any) -> dict[str, Any]:
    """The JSON object in ``path`` (local or gs://); RunFileError when it is missing,
    not JSON, or not an object."""
    text = workdir_io.read_text(path)
    if text is None:
        raise RunFileError(f"{path} not found")
    try:
        value = json.loads(text)
    except ValueError as e:
        raise RunFileError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise RunFileError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


def read_json(path: Any) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        return load_json(path)
    except (RunFileError, OSError):
        return None


def read_jsonl(path: Any) -> tuple[list[dict[str, Any]], int]:
    """``(objects, bad lines)`` of a JSONL file (missing: ``([], 0)``); a line that is not
    a JSON object (e.g. one cut by a crash) is counted, not returned."""
    text = workdir_io.read_text(path, "") or ""
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad
