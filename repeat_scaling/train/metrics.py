"""Training metrics: JSONL, TensorBoard, progress display and throughput accounting.

* ``workdir/train/metrics.jsonl``: one JSON object per logged step (see
  :data:`FIELDS`); written by process 0 only. On resume, lines past the restored step
  are dropped (they belong to the lost part of the interrupted run), so the file always
  describes one consistent run.
* ``workdir/tensorboard/``: a tensorboardX event writer with the same scalars.

The workdir may be a gs:// URL (:mod:`repeat_scaling.workdir_io`): the JSONL files are
then re-uploaded whole at most every ``flush_seconds`` (object stores cannot append) and
on close; tensorboardX writes gs:// event files itself through google-cloud-storage
(re-uploading the event file on each of its flushes, every 120 s); without that package
TensorBoard output is skipped with one log line.
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
import sys
import time
from typing import Any

from repeat_scaling import workdir_io

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
        self.path = self.workdir / "train" / "metrics.jsonl"
        self._tb = None
        self._file = None
        if is_primary:
            workdir_io.mkdirs(self.path.parent)
            truncate_jsonl(self.path, start_step)
            truncate_jsonl(self.workdir / "train" / "eval.jsonl", start_step)
            self._file = workdir_io.JsonlAppender(self.path, flush_seconds=flush_seconds)
            self._tb = _summary_writer(self.workdir / "tensorboard")
        use_bar = {"on": True, "off": False}.get(progress_bar, sys.stderr.isatty())
        self._bar = None
        if use_bar and is_primary:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._t0 = time.time()

    def write(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        step = int(record["step"])
        if self._file is not None:
            self._file.write_line(json.dumps(record))
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and v is not None:
                    self._tb.add_scalar(f"train/{k}", v, step)
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
            print(
                f"step {step}/{self.total_steps} loss={record['loss']:.4f} "
                f"acc={record.get('accuracy', 0):.3f} lr={record['learning_rate']:.3g} "
                f"tokens/s={record.get('tokens_per_s') or 0:.0f}{mfu_s}",
                file=sys.stderr,
                flush=True,
            )

    def write_eval(self, step: int, values: dict[str, float]) -> None:
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"eval/{k}", v, step)
        if self.is_primary:
            path = self.workdir / "train" / "eval.jsonl"
            workdir_io.append_line(path, json.dumps({"step": step, **values}))

    def flush(self) -> None:
        """Push buffered lines (on GCS: re-upload ``metrics.jsonl``) and TB events."""
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _summary_writer(logdir: workdir_io.WPath) -> Any:
    """A tensorboardX writer for ``logdir`` (local or gs://), or None with one log line."""
    from tensorboardX import SummaryWriter

    try:
        return SummaryWriter(str(logdir))
    except ImportError as e:  # gs:// without google-cloud-storage
        print(f"tensorboard: skipped ({e})", file=sys.stderr, flush=True)
        return None
