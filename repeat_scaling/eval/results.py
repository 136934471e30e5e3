"""``eval/results.jsonl``: one JSON object per evaluated checkpoint step, crash-safe.

Writing: each record is serialised to ONE line and written with a single ``write`` call
on a file opened in append mode, then flushed and fsync'ed, so a line is either fully on
disk or (if the process is killed mid-write) a truncated tail without a newline. The
writer re-reads the file when it opens it, so a restarted evaluator skips steps already
recorded and never duplicates a line. A truncated tail left by a kill is terminated with a
newline before the next append (it is then a corrupt line, reported and skipped).

Only one writer per results file at a time: the writer holds the
:class:`~repeat_scaling.workdir_io.WorkdirLock` ``eval/results.lock`` (the trainer's lock
mechanism: owner host:pid and a heartbeat every 60 s; taken over when its holder is a dead
process on this host, e.g. after kill -9, or its heartbeat is older than 5 minutes); a
second evaluator on the same workdir fails with a clear error instead of racing.

On a gs:// workdir (:mod:`repeat_scaling.workdir_io`) an object cannot be appended to:
each ``append`` re-uploads the whole results object (one upload per evaluated step; the
upload is atomic, so readers see the old or the new file). Before each upload the writer
re-reads the lock and raises :class:`ResultsLockedError` if another evaluator has taken
it over (e.g. after this one was paused for longer than 5 minutes).

Reading: a line that is not a JSON object with an integer ``step`` is reported (a warning
naming the file and line number) and skipped, never fatal. When the same step appears
twice (only possible by hand-editing), the first record wins.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

from absl import logging

from repeat_scaling import run_files, workdir_io

#: Steps that could not be evaluated (corrupt checkpoint, non-finite metrics): one line
#: each, never counted as done, retried by the next pass.


class ResultsLockedError(RuntimeError):
    """Another evaluator is writing the same results file."""


def results_path(workdir: str | os.PathLike) -> workdir_io.WPath:
    """``workdir/eval/results.jsonl`` (local path, or an epath for a gs:// workdir)."""
    return workdir_io.workdir_path(workdir) / run_files.RESULTS


def _jsonable(value: Any) -> Any:
    """Numpy scalars/arrays to Python; NaN/Inf to None (strict JSON)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def read_results(
    path: str | os.PathLike, warn: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Valid records of a results file in file order (missing file -> []).

    Corrupt lines are reported through ``warn`` (default: absl warning) and skipped.
    """
    path = workdir_io.workdir_path(path)
    warn = warn or logging.warning
    content = workdir_io.read_text(path)
    if content is None:
        return []
    records: list[dict[str, Any]] = []
    seen: set[int] = set()
    for lineno, raw in enumerate(content.split("\n"), start=1):
        text = raw.strip()
        if not text:
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            warn(f"{path}:{lineno}: corrupt results line skipped ({e.msg})")
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            warn(f"{path}:{lineno}: results line without an integer 'step' skipped")
            continue
        if step in seen:
            warn(f"{path}:{lineno}: duplicate record for step {step} skipped")
            continue
        seen.add(step)
        records.append(record)
    return records


class ResultsWriter:
    """Appends records to ``eval/results.jsonl`` exactly once per step.

    >>> w = ResultsWriter(workdir)          # re-reads what is already there
    >>> if not w.done(step): w.append({"step": step, ...})
    """

    def __init__(self, workdir: str | os.PathLike, warn: Callable[[str], None] | None = None):
        self.workdir = workdir_io.workdir_path(workdir)
        self.path = self.workdir / run_files.RESULTS
        workdir_io.mkdirs(self.path.parent)
        lock = workdir_io.workdir_lock(self.workdir / run_files.EVAL_LOCK)
        try:
            lock.acquire()
        except workdir_io.LockError as e:
            raise ResultsLockedError(f"another evaluator is writing {self.path} ({e})") from None
        if lock.took_over:
            (warn or logging.warning)(lock.took_over)
        self._lock: workdir_io.WorkdirLock | None = lock
        self._warn = warn or logging.warning
        self.records = read_results(self.path, warn=self._warn)
        self._done = {r["step"] for r in self.records}

    def close(self) -> None:
        """Release the writer lock (a killed writer's lock is taken over: see
        :class:`~repeat_scaling.workdir_io.WorkdirLock`)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    @property
    def done_steps(self) -> set[int]:
        return set(self._done)

    def done(self, step: int) -> bool:
        return int(step) in self._done

    def _terminate_partial_tail(self) -> None:
        """If a kill left a final line without newline, end it so appends stay separate."""
        if not isinstance(self.path, pathlib.Path):
            return  # GCS objects are replaced whole, never left half-written
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
        if last != b"\n":
            with open(self.path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())

    def record_error(self, step: int, message: str) -> None:
        """Append ``{"step", "error", "time"}`` to ``eval/errors.jsonl`` (the step stays
        pending: the next pass retries it)."""
        import time

        line = {"step": int(step), "error": message, "time": time.time()}
        workdir_io.append_line(self.workdir / run_files.EVAL_ERRORS, json.dumps(line))

    def append(self, record: dict[str, Any]) -> bool:
        """Write ``record`` as one line unless its step is done; returns True if written."""
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"results record needs an integer 'step', got {step!r}")
        if step in self._done:
            return False
        line = json.dumps(_jsonable(record), allow_nan=False, separators=(",", ":")) + "\n"
        if self._lock is not None:
            try:
                self._lock.check()  # taken over while paused: never clobber
            except workdir_io.LockError as e:
                raise ResultsLockedError(f"cannot write {self.path}: {e}") from None
        if isinstance(self.path, pathlib.Path):
            self._terminate_partial_tail()
            with open(self.path, "ab") as f:
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        else:  # no appends on object stores: re-upload the whole (small) object
            text = workdir_io.read_text(self.path, "")
            if text and not text.endswith("\n"):
                text += "\n"
            workdir_io.write_text_atomic(self.path, text + line)
        self._done.add(step)
        self.records.append(record)
        return True
