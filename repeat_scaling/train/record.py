"""A run's record: what the workdir says was trained, and what a resume may change.

The run that creates a workdir writes ``config.json`` (the resolved config plus
``derived`` facts) and ``data_plan.json`` once, after its state is created and before
its first step; they are never rewritten while the workdir holds a committed checkpoint.
A workdir whose record has no committed checkpoint behind it (a start that failed or was
killed before its first save) trained nothing, and the next start replaces the record.

A resume compares its resolved config with ``config.json`` key by key
(:func:`differences`). Any difference outside :data:`RESUMABLE` changes what was trained
and is refused with one line naming every differing key with both values
(:func:`check_resume`). Differences in :data:`RESUMABLE` are accepted and appended, with
the step they start from, to ``resume_log.jsonl`` in the workdir
(:func:`append_resume_log`); :func:`effective_config` applies them to the record (the
evaluator and the report read a run's config through it).

``train.steps`` is resumable only when the steps already trained keep their data and
learning rates; the trainer checks both. The repetition plans order their slots by the
total slot count, so with this project's plans a different ``train.steps`` is refused
(a longer run is a new run); a schedule that decays over ``train.steps`` is named too.
"""

from __future__ import annotations

import copy
import json
import pathlib
import time
from typing import Any

from repeat_scaling import run_files, workdir_io

#: Keys that may differ on resume: how long, how often to save/log/evaluate, where the
#: same data lives, the mesh (parameters are restored onto any mesh), and display.
RESUMABLE = (
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep",
    "train.keep_period",
    "train.async_checkpointing",
    "train.eval_every",
    "train.eval_batches",
    "train.steps_per_call",
    "train.profile_start_step",
    "train.profile_steps",
    "train.progress_bar",
    "train.peak_tflops",
    "data.prefetch",
    "data.store",
    "data.source",
    "data.vocab",
    "data.prepare_options",
    "model.scan_unroll",  # the compiled program's loop, not the model
    "model.ops",  # the gradients' kernels (tuned or plain einsums), not the model
    "model.attention_impl",  # the attention's kernel, not the model
)
#: Groups of keys (every key under them) that may differ on resume.
RESUMABLE_GROUPS = ("eval", "mesh")
#: Top-level entries that are not compared here: facts recomputed by every start
#: (package versions, device count, ...), the sweep list of a base config, and the
#: fine-tuning source, which ``train.init_from.check_resume`` compares with its record
#: (``init_from.json``: one source may be named as a workdir or as a checkpoint path).
NOT_COMPARED = ("derived", "sweep", "init_from", "init_step")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty dict has no keys."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def _normal(obj: Any) -> Any:
    """``obj`` as JSON would give it back (tuples -> lists, numpy -> Python)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=run_files.json_default))


def is_resumable(key: str) -> bool:
    return (
        key in RESUMABLE
        or any(key == g or key.startswith(g + ".") for g in RESUMABLE_GROUPS)
        or any(key.startswith(k + ".") for k in RESUMABLE)
    )


def _defaults() -> dict[str, Any]:
    """Every config key's default (``model.*`` from ModelConfig), flattened: what a
    record written before a key existed meant by leaving it out."""
    from repeat_scaling.models.config import ModelConfig
    from repeat_scaling.train.config import default_config

    d = default_config().to_dict()
    d["model"] = ModelConfig().to_dict()
    return flatten(_normal(d))


def differences(recorded: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, new value)`` for every dotted key that differs. A key the
    record does not have (it predates the key) counts as its default."""
    a = flatten({k: v for k, v in _normal(recorded).items() if k not in NOT_COMPARED})
    b = flatten({k: v for k, v in _normal(new).items() if k not in NOT_COMPARED})
    missing = object()
    defaults = _defaults()
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, defaults.get(key, missing)), b.get(key, missing)
        if va != vb:
            out.append((key, None if va is missing else va, None if vb is missing else vb))
    return out


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} (recorded) vs {b!r} (now)" for k, a, b in changes)


def check_resume(
    workdir: Any, recorded: dict[str, Any], new: dict[str, Any]
) -> list[tuple[str, Any, Any]]:
    """The resumable differences of ``new`` from the ``recorded`` config; a
    :class:`~repeat_scaling.train.config.ConfigError` (one line) naming every other one."""
    from repeat_scaling.train.config import ConfigError

    diffs = differences(recorded, new)
    refused = [d for d in diffs if not is_resumable(d[0])]
    if refused:
        raise ConfigError(
            f"{workdir} was trained with another config; refusing to resume with "
            f"{describe(refused)} (use a new --workdir; keys that may change on resume: "
            f"{', '.join(RESUMABLE + tuple(g + '.*' for g in RESUMABLE_GROUPS))})"
        )
    return diffs


def append_resume_log(workdir: Any, step: int, changes: list[tuple[str, Any, Any]]) -> None:
    """One line ``{"step", "time", "changes": {key: [recorded, now]}}``."""
    line = {
        "step": int(step),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "changes": {k: [a, b] for k, a, b in changes},
    }
    workdir_io.append_line(
        workdir / run_files.RESUME_LOG, json.dumps(_normal(line), sort_keys=True)
    )


def read_resume_log(workdir: Any) -> list[dict[str, Any]]:
    """The resume log's entries (unreadable lines skipped; [] when there is none)."""
    text = workdir_io.read_text(workdir_io.workdir_path(workdir) / run_files.RESUME_LOG, "") or ""
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("changes"), dict):
            out.append(entry)
    return out


def effective_config(config: dict[str, Any], log: list[dict[str, Any]]) -> dict[str, Any]:
    """``config`` (config.json) with the resume log's changes applied, latest last."""
    out = copy.deepcopy(config)
    for entry in log:
        for key, (_, value) in entry["changes"].items():
            node = out
            *path, last = key.split(".")
            for p in path:
                node = node.setdefault(p, {})
            node[last] = value
    return out


def find_store(workdir: Any, store: str) -> tuple[pathlib.Path | None, list[pathlib.Path]]:
    """A run's token store from its recorded ``data.store``: ``(found or None, tried)``.

    Tried in order: the path as recorded (the trainer records an absolute path; a relative
    one, from older records, is taken from the current directory), then, for a relative
    path, inside a local ``workdir``. A store is a directory with a ``manifest.json``.
    A URL is a one-line :class:`~repeat_scaling.workdir_io.WorkdirError` (stores are
    memory-mapped, so local).
    """
    given = workdir_io.require_local(store, "data.store").expanduser()
    tried = [given.absolute()]
    if not given.is_absolute() and isinstance(workdir, pathlib.Path):
        tried.append(workdir / given)
    found = next((p for p in tried if (p / "manifest.json").is_file()), None)
    return found, tried
