"""Training metrics: JSONL, TensorBoard, progress display and throughput accounting.

* ``workdir/train/metrics.jsonl``: one JSON object per logged step (see
  :data:`FIELDS`); written by process 0 only. On resume, lines past the restored step
  are dropped (they belong to the lost part of the interrupted run), so the file always
  describes one consistent run.
* ``workdir/tensorboard/``: TensorBoard events with the same scalars, written by the
  trainer's thread (:class:`EventWriter`).
* A write error (disk full, ...) of either stops the trainer with one line
  (:class:`MetricsIOError`); committed checkpoints are kept.

The workdir may be a gs:// URL (:mod:`repeat_scaling.workdir_io`): the JSONL files are
then re-uploaded whole at most every ``flush_seconds`` (object stores cannot append) and
on close. TensorBoard events for a gs:// workdir are written to a local temporary
directory and uploaded to ``workdir/tensorboard/`` (each event file as one object) on
the same schedule (:class:`SyncedSummaryWriter`; tensorboardX's own gs:// writer keeps
every event in memory and re-uploads from ``__del__``, so it is not used).
* Progress: a tqdm bar with ETA when stderr is a terminal, plain log lines otherwise.

Throughput: ``tokens_per_s`` counts all processed tokens (encoder + decoder for
encoder-decoder models); ``model_tflops_per_s`` = training model FLOPs (3x forward,
REFERENCE.md section 5) per second for the whole job; ``mfu`` = that over the peak of
the hardware units in the job (``peak_tflops`` per unit).
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

from repeat_scaling import run_files, workdir_io

FIELDS = (
    "step",
    "loss",
    "accuracy",
    "z_loss",
    "aux_loss",
    "learning_rate",
    "grad_norm",
    "tokens_seen",
    "unique_tokens_seen",
    "repeated_tokens_seen",
    "step_time_s",
    "tokens_per_s",
    "model_tflops_per_s",
    "mfu",
)

#: Dense peak TFLOP/s per chip in bf16, by jax ``device_kind`` substring (public specs).
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def lookup_peak_tflops(device_kind: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None


def hardware_units(platform: str, device_count: int, process_count: int) -> int:
    """Chips the peak applies to: devices on accelerators, hosts on CPU."""
    return process_count if platform == "cpu" else device_count


def throughput(
    step_time_s: float,
    tokens_per_step: int,
    train_flops_per_token: float,
    peak_tflops_total: float | None,
) -> dict[str, float | None]:
    tokens_per_s = tokens_per_step / step_time_s if step_time_s > 0 else float("nan")
    tflops = tokens_per_s * train_flops_per_token / 1e12
    mfu = tflops / peak_tflops_total if peak_tflops_total else None
    return {"tokens_per_s": tokens_per_s, "model_tflops_per_s": tflops, "mfu": mfu}


def format_duration(seconds: float | None) -> str:
    """Seconds as ``1h02m``, ``3m05s``, ``42s``, or ``-`` when unknown."""
    if seconds is None:
        return "-"
    seconds = int(round(max(seconds, 0)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def truncate_jsonl(path: workdir_io.WPath, max_step: int) -> None:
    """Drop lines with ``step > max_step`` (and unreadable lines), atomically."""
    text = workdir_io.read_text(path)
    if text is None:
        return
    keep = []
    for line in text.splitlines():
        try:
            if json.loads(line)["step"] <= max_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    workdir_io.write_text_atomic(path, "".join(k + "\n" for k in keep))


class MetricsIOError(workdir_io.WorkdirError):
    """Writing metrics or TensorBoard events failed (disk full, ...); one line."""


class EventWriter:
    """TensorBoard scalar events written synchronously by the calling thread.

    tensorboardX's ``SummaryWriter`` writes from a thread: when that thread dies (disk
    full) the trainer blocks forever in ``add_scalar``. Here a write error is raised
    where the trainer can stop on it.
    """

    def __init__(self, logdir: str | pathlib.Path):
        from tensorboardX.event_file_writer import EventsWriter

        pathlib.Path(logdir).mkdir(parents=True, exist_ok=True)
        self._writer = EventsWriter(str(pathlib.Path(logdir) / "events"))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        event = Event(wall_time=time.time(), step=int(step), summary=scalar(tag, value))
        self._writer.write_event(event)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsWriter:
    """Writes metrics of logged steps (process 0 writes, the others only display)."""

    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        total_steps: int,
        start_step: int,
        is_primary: bool = True,
        progress_bar: str = "auto",
        flush_seconds: float = 30.0,
    ):
        self.workdir = workdir_io.workdir_path(workdir)
        self.is_primary = is_primary
        self.total_steps = total_steps
        self.start_step = start_step
        self.path = self.workdir / run_files.METRICS
        self._tb = None
        self._file = None
        self._failed = False
        if is_primary:
            workdir_io.mkdirs(self.path.parent)
            truncate_jsonl(self.path, start_step)
            truncate_jsonl(self.workdir / run_files.TRAIN_EVAL, start_step)
            self._file = workdir_io.JsonlAppender(self.path, flush_seconds=flush_seconds)
            if isinstance(self.workdir, pathlib.Path):
                self._tb = EventWriter(self.workdir / run_files.TENSORBOARD)
            else:
                self._tb = SyncedSummaryWriter(self.workdir / run_files.TENSORBOARD, flush_seconds)
        use_bar = {"on": True, "off": False}.get(progress_bar, sys.stderr.isatty())
        self._bar = None
        if use_bar and is_primary:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._t0 = time.time()

    def _io(self, fn, *args) -> Any:
        """``fn(*args)``; an OSError (disk full, ...) becomes a one-line MetricsIOError."""
        try:
            return fn(*args)
        except OSError as e:
            self._failed = True
            raise MetricsIOError(
                f"cannot write metrics under {self.workdir} ({e.strerror or e}); stopped, "
                "committed checkpoints are kept"
            ) from None

    def write(self, record: dict[str, Any]) -> None:
        self._io(self._write, record)

    def _write(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        step = int(record["step"])
        if self._file is not None:
            self._file.write_line(json.dumps(record))
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and v is not None:
                    self._tb.add_scalar(f"train/{k}", v, step)
            if isinstance(self._tb, SyncedSummaryWriter):
                self._tb.maybe_sync()
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                tok_s=f"{record.get('tokens_per_s') or 0:.0f}",
                refresh=False,
            )
            self._bar.refresh()
        elif self.is_primary:
            mfu = record.get("mfu")
            mfu_s = f" mfu={100 * mfu:.1f}%" if mfu is not None else ""
            elapsed = time.time() - self._t0
            done = step - self.start_step
            eta = elapsed / done * (self.total_steps - step) if done > 0 else None
            print(
                f"step {step}/{self.total_steps} loss={record['loss']:.4f} "
                f"acc={record.get('accuracy', 0):.3f} lr={record['learning_rate']:.3g} "
                f"tokens/s={record.get('tokens_per_s') or 0:.0f}{mfu_s} "
                f"elapsed={format_duration(elapsed)} eta={format_duration(eta)}",
                file=sys.stderr,
                flush=True,
            )

    def write_eval(self, step: int, values: dict[str, float]) -> None:
        self._io(self._write_eval, step, values)

    def _write_eval(self, step: int, values: dict[str, float]) -> None:
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"eval/{k}", v, step)
        if self.is_primary:
            path = self.workdir / run_files.TRAIN_EVAL
            workdir_io.append_line(path, json.dumps({"step": step, **values}))

    def flush(self) -> None:
        """Push buffered lines (on GCS: re-upload ``metrics.jsonl``) and TB events."""
        self._io(self._flush)

    def _flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        failed = self._failed  # after a write error, closing may fail the same way
        if self._bar is not None:
            self._bar.close()
        try:
            self._io(self._close)
        except MetricsIOError:
            if not failed:
                raise
        finally:
            self._file = self._tb = None

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class SyncedSummaryWriter:
    """tensorboardX events written locally and uploaded to a gs:// directory.

    ``maybe_sync`` uploads at most every ``sync_seconds``; ``flush``/``close`` always
    do. Each local event file becomes one object (re-uploaded whole: event files of
    scalar summaries stay small). The temporary directory is removed on ``close``.
    """

    def __init__(self, remote: workdir_io.WPath, sync_seconds: float = 30.0):
        self.remote = remote
        self.sync_seconds = float(sync_seconds)
        self.local = pathlib.Path(tempfile.mkdtemp(prefix="repeat_scaling_tb_"))
        self._writer = EventWriter(self.local)
        self._last = time.monotonic()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.add_scalar(tag, value, step)

    def maybe_sync(self) -> None:
        if time.monotonic() - self._last >= self.sync_seconds:
            self.flush()

    def flush(self) -> None:
        self._writer.flush()
        self._upload()

    def _upload(self) -> None:
        for f in sorted(self.local.rglob("*")):
            if f.is_file():
                workdir_io.upload_file(f, self.remote / f.relative_to(self.local).as_posix())
        self._last = time.monotonic()

    def close(self) -> None:
        self._writer.close()  # flushes
        self._upload()
        shutil.rmtree(self.local, ignore_errors=True)
