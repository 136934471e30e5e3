"""The evaluator's metrics as TensorBoard scalars, read back with TensorBoard's own reader."""

import math

import pytest

from repeat_scaling.eval import tensorboard as eval_tb

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _read(directory):
    acc = event_accumulator.EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_flatten_numbers_and_skip_the_rest():
    record = {
        "step": 4,
        "test_loss": 2.5,
        "repeated_loss": None,
        "probes": {"prefix_matching": 0.25, "layer": "all"},
        "done": True,
        "icl_score": math.nan,
        "checkpoint": "4",
        "num_devices": 8,
    }
    assert dict(eval_tb.scalars(record)) == {
        "eval/test_loss": 2.5,
        "eval/probes/prefix_matching": 0.25,
    }


def test_each_step_once_after_a_re_evaluation(tmp_path):
    eval_tb.write_step(tmp_path, {"step": 10, "test_loss": 3.0, "copying_loss": 4.0})
    eval_tb.write_step(tmp_path, {"step": 20, "test_loss": 2.0, "copying_loss": 3.5})
    # A second evaluator pass re-evaluates step 10 (e.g. after a corrupt checkpoint).
    eval_tb.write_step(tmp_path, {"step": 10, "test_loss": 2.9, "copying_loss": 4.0})
    got = _read(tmp_path / "tensorboard" / "eval")
    assert got["eval/test_loss"] == [(10, pytest.approx(2.9)), (20, pytest.approx(2.0))]
    assert got["eval/copying_loss"] == [(10, pytest.approx(4.0)), (20, pytest.approx(3.5))]
    names = sorted(p.name for p in (tmp_path / "tensorboard" / "eval").iterdir())
    assert names == [eval_tb.event_file_name(10), eval_tb.event_file_name(20)]
    # Results recorded without event files get theirs; existing ones are left alone.
    records = [{"step": 10, "test_loss": 1.0}, {"step": 30, "test_loss": 1.5}]
    assert eval_tb.write_missing(tmp_path, records) == 1
    got = _read(tmp_path / "tensorboard" / "eval")
    assert [s for s, _ in got["eval/test_loss"]] == [10, 20, 30]
    assert got["eval/test_loss"][0][1] == pytest.approx(2.9)
