"""Several train steps per compiled call (``train.steps_per_call``, a ``lax.scan``).

The multi-step path must train exactly like one step per call: every logged metric
(loss, accuracy, grad norm, learning rate, token accounting) bit-identical, the same
final parameters bit for bit, checkpoints and in-loop evals at the same steps, exact
resume from any checkpoint, grad accumulation, NaN stop without saving the bad state.
Measured on this CPU (8 virtual devices): the scan does not change any float.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from test_train_loop import tiny_config

from repeat_scaling.data.batcher import Batcher
from repeat_scaling.train import checkpointing, loop
from repeat_scaling.train import config as config_lib

TIMING = {"step_time_s", "tokens_per_s", "model_tflops_per_s", "mfu"}


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _run(store_dir, workdir, k, **overrides):
    base = {"train.steps": 14, "train.checkpoint_every": 6, "train.keep": 10}
    c = tiny_config(store_dir, **{**base, **overrides, "train.steps_per_call": k})
    summary = loop.train(c, workdir)
    metrics = [
        {f: v for f, v in r.items() if f not in TIMING}
        for r in _jsonl(workdir / "train" / "metrics.jsonl")
    ]
    ck = checkpointing.Checkpointer(workdir, save_every=1)
    steps = ck.all_steps()
    ck.close()
    _, params, _ = checkpointing.restore_params(workdir)
    return summary, metrics, _jsonl(workdir / "train" / "eval.jsonl"), sorted(steps), params


def _assert_same_run(a, b):
    (sa, ma, ea, ca, pa), (sb, mb, eb, cb, pb) = a, b
    assert sa["final_step"] == sb["final_step"]
    assert ma == mb  # every logged step, every field except timing: bit-identical
    assert ea == eb and ca == cb
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_call_spans_cut_at_periods_and_marks():
    spans = list(loop.call_spans(0, 14, (4, 6), (9,)))
    assert spans == [(0, 4), (4, 2), (6, 2), (8, 1), (9, 3), (12, 2)]
    # From any call end, the remaining calls are the uninterrupted run's.
    for i, (s, _) in enumerate(spans):
        assert list(loop.call_spans(s, 14, (4, 6), (9,))) == spans[i:]
    assert list(loop.call_spans(0, 3, (1, 0))) == [(0, 1), (1, 1), (2, 1)]
    assert list(loop.call_spans(5, 5, (4,))) == []


def test_multi_step_calls_train_exactly_like_single_steps(store_dir, tmp_path):
    kw = {"train.eval_every": 7, "train.eval_batches": 1, "data.repeated_fraction": 0.25}
    kw["data.repeated_epochs"] = 4  # exercises the repeated / unique token accounting
    one = _run(store_dir, tmp_path / "k1", 1, **kw)
    four = _run(store_dir, tmp_path / "k4", 4, **kw)
    _assert_same_run(one, four)
    assert [r["step"] for r in one[1]] == list(range(1, 15))
    assert one[3] == [6, 12, 14] and [e["step"] for e in one[2]] == [7, 14]
    assert one[1][-1]["repeated_tokens_seen"] > 0 and one[1][-1]["unique_tokens_seen"] > 0
    recorded = json.loads((tmp_path / "k4" / "config.json").read_text())
    assert recorded["derived"]["steps_per_call"] == 4


def test_grad_accumulation_and_resume_with_multi_step_calls(store_dir, tmp_path):
    kw = {"train.grad_accum": 2, "train.batch_size": 16}
    ref = _run(store_dir, tmp_path / "k1", 1, **kw)
    full = _run(store_dir, tmp_path / "k3", 3, **kw)
    _assert_same_run(ref, full)
    # Resume from the step-6 checkpoint (the step-12 and -14 ones lost): bit-exact.
    shutil.copytree(tmp_path / "k3", tmp_path / "resumed")
    for s in (12, 14):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(s))
    c = tiny_config(
        store_dir,
        **{"train.steps": 14, "train.checkpoint_every": 6, "train.keep": 10},
        **{"train.steps_per_call": 3, **kw},
    )
    assert loop.train(c, tmp_path / "resumed")["resumed_from"] == 6
    metrics = [
        {f: v for f, v in r.items() if f not in TIMING}
        for r in _jsonl(tmp_path / "resumed" / "train" / "metrics.jsonl")
    ]
    assert metrics == ref[1]


def test_nan_inside_a_multi_step_call_stops_without_saving(store_dir, tmp_path):
    c = tiny_config(store_dir, **{"train.checkpoint_every": 4, "train.steps_per_call": 4})
    c.train.optimizer.learning_rate = 1e38  # the first update overflows the parameters
    with pytest.raises(loop.NonFiniteLossError, match=r"at step (\d+) ") as e:
        loop.train(c, tmp_path)
    # The first bad step of the first 4-step call is named; the call's state is not saved.
    assert int(str(e.value).split("at step ")[1].split()[0]) in (2, 3, 4)
    assert not checkpointing.committed_steps(tmp_path)


def test_steps_per_call_validation_and_auto(store_dir):
    c = tiny_config(store_dir, **{"train.steps_per_call": -1})
    with pytest.raises(config_lib.ConfigError, match=r"train.steps_per_call=-1; expected an int"):
        config_lib.validate(c, num_devices=8)
    c.train.steps_per_call = 0
    config_lib.validate(c, num_devices=8)
    assert config_lib.steps_per_call(c, 1e6) == config_lib.MAX_AUTO_STEPS_PER_CALL
    assert config_lib.steps_per_call(c, config_lib.AUTO_CALL_FLOPS / 3) == 3
    assert config_lib.steps_per_call(c, config_lib.AUTO_CALL_FLOPS) == 1
    c.train.steps_per_call = 5
    assert config_lib.steps_per_call(c, 1e15) == 5


def test_batcher_spans_and_accounting_match_per_step(store_dir):
    c = tiny_config(store_dir, **{"data.repeated_fraction": 0.5, "data.repeated_epochs": 4})
    cfg = config_lib.validate(c, num_devices=8)
    store, objective, plan = loop.open_data(c, cfg)
    b = Batcher(store.split("train"), plan, objective, 8, 0, process_index=1, process_count=2)
    stacked = b.batches(3, 4)
    for i in range(4):
        for k, v in b.batch(3 + i).items():
            np.testing.assert_array_equal(stacked[k][i], v)
    reps = b.repeated_examples(0, b.num_steps)
    assert [int(r) for r in reps] == [
        b.accounting(s)["repeated_examples"] for s in range(b.num_steps)
    ]
    assert 0 < reps.sum() < 8 * b.num_steps
    got = list(b.iter_spans([(0, 2), (2, 1)]))
    assert [g["decoder_target_tokens"].shape[0] for g in got] == [2, 1]
    np.testing.assert_array_equal(
        got[1]["decoder_target_tokens"][0], b.batch(2)["decoder_target_tokens"]
    )
    b.close()


def test_unrolled_layer_stack_trains_like_the_loop(store_dir, tmp_path):
    """``model.scan_unroll`` >= the layer count: the same parameters and math as straight-
    line code; XLA orders a few reductions differently, so floats agree to the last bits
    (measured: grad_norm 1 ulp apart at step 5, parameters <= 1.2e-7 apart at step 6)."""
    kw = {"train.steps": 6, "train.checkpoint_every": 6}
    (_, ma, _, ca, pa) = _run(store_dir, tmp_path / "u1", 1, **kw)
    (_, mb, _, cb, pb) = _run(store_dir, tmp_path / "u2", 1, **kw, **{"model.scan_unroll": 2})
    assert ca == cb and [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(1, 7))
    for a, b in zip(ma, mb, strict=True):
        assert a["tokens_seen"] == b["tokens_seen"]
        np.testing.assert_allclose(
            [a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]], rtol=1e-5
        )
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)
