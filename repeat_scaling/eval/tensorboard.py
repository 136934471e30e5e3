"""The evaluator's metrics as TensorBoard scalars: ``workdir/tensorboard/eval/``.

Every numeric field of an ``eval/results.jsonl`` record (test loss, repeated-subset
loss, copying loss, probe scores, ICL score, ...; nested groups joined with ``/``)
becomes the scalar ``eval/<field>`` at the record's step. TensorBoard shows the
trainer's ``tensorboard/`` and this ``tensorboard/eval/`` as two runs of one workdir, so
``tensorboard --logdir=ROOT`` draws every run's degradation curves while they grow.

One event file per evaluated step, ``events.out.tfevents.<step, 10 digits>.eval``,
written whole (a local temporary file renamed into place, or one object upload on
gs://). Writing a step again replaces its file, so a re-evaluated step is never
duplicated, and the files sort in step order (TensorBoard reads a directory's event
files in name order).
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from repeat_scaling import run_files, workdir_io

#: Where the evaluator's event files go, under the run's workdir.
SUBDIR = (run_files.TENSORBOARD, "eval")
#: Tag prefix of the evaluator's scalars (the trainer's are ``train/...``).
TAG_PREFIX = "eval/"
#: Numeric record fields that are not metrics.
NOT_SCALARS = frozenset({"step", "num_devices"})


def event_file_name(step: int) -> str:
    """The event file of ``step`` (names sort in step order)."""
    return f"events.out.tfevents.{int(step):010d}.eval"


def scalars(record: Mapping[str, Any], prefix: str = TAG_PREFIX) -> Iterator[tuple[str, float]]:
    """``(tag, value)`` for every finite number in ``record`` (bools and text skipped)."""
    for key, value in record.items():
        if key in NOT_SCALARS and prefix == TAG_PREFIX:
            continue
        if isinstance(value, Mapping):
            yield from scalars(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                yield f"{prefix}{key}", float(value)


def _masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    x = crc32c(data) & 0xFFFFFFFF
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    """One TFRecord frame (length, masked CRCs) around ``data``."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", _masked_crc(header))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


def event_file_bytes(step: int, record: Mapping[str, Any], wall_time: float) -> bytes:
    """The bytes of ``record``'s event file: the version event, then one Summary."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary

    values = [Summary.Value(tag=t, simple_value=v) for t, v in scalars(record)]
    head = Event(wall_time=wall_time, step=int(step), file_version="brain.Event:2")
    body = Event(wall_time=wall_time, step=int(step), summary=Summary(value=values))
    return _record(head.SerializeToString()) + _record(body.SerializeToString())


def write_step(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write (or replace) the event file of ``record["step"]`` under ``workdir``."""
    step = int(record["step"])
    directory = workdir_io.workdir_path(workdir).joinpath(*SUBDIR)
    data = event_file_bytes(step, record, time.time())
    workdir_io.write_bytes_atomic(directory / event_file_name(step), data)


def write_missing(workdir: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Write the event files of ``records`` that have none yet (results recorded before
    the event files existed); returns how many were written."""
    directory = workdir_io.workdir_path(workdir).joinpath(*SUBDIR)
    have = {p.name for p in directory.iterdir()} if directory.exists() else set()
    todo = [r for r in records if event_file_name(r["step"]) not in have]
    for r in todo:
        write_step(workdir, r)
    return len(todo)
