"""Batcher and pipeline builders: exact resume, host sharding, accounting, errors."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repeat_scaling.data import pipeline
from repeat_scaling.data.batcher import ArraySplit, Batcher, BatcherError
from repeat_scaling.data.repetition import RepetitionPlanError
from repeat_scaling.data.vocab import load_vocab_info

VOCAB = load_vocab_info("byte")


@pytest.fixture(scope="module")
def store(c4_byte_store):
    return c4_byte_store


@pytest.fixture(scope="module")
def setup(store):
    train = store.split("train")
    obj = pipeline.make_objective(
        "span_corruption", store.vocab, "encoder_decoder", inputs_length=128
    )
    plan = pipeline.build_plan(
        train,
        obj,
        num_steps=40,
        global_batch_size=16,
        repeated_fraction=0.25,
        repeated_epochs=5,
        seed=3,
    )
    return train, obj, plan


def _same(a, b):
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@settings(max_examples=8, deadline=None)
@given(step=st.integers(0, 39))
def test_identical_global_batches_for_1_2_4_hosts(setup, step):
    train, obj, plan = setup
    full = Batcher(train, plan, obj, 16, seed=11).batch(step)
    for hosts in (2, 4):
        parts = [Batcher(train, plan, obj, 16, 11, p, hosts).batch(step) for p in range(hosts)]
        joined = {k: np.concatenate([p[k] for p in parts]) for k in full}
        assert _same(full, joined)


def test_resume_after_restart_is_exact(setup):
    train, obj, plan = setup
    first = Batcher(train, plan, obj, 16, seed=11)
    uninterrupted = list(first.iter_from(0))
    assert len(uninterrupted) == first.num_steps == 40
    first.close()
    # "Restart" at step 23 with a fresh batcher (no state carried over).
    resumed = Batcher(train, plan, obj, 16, seed=11, prefetch=3)
    tail = list(resumed.iter_from(23))
    assert len(tail) == 17
    assert all(_same(a, b) for a, b in zip(uninterrupted[23:], tail))
    assert _same(resumed.batch(30), uninterrupted[30])
    # A different seed changes the noise but not the chunks.
    other = Batcher(train, plan, obj, 16, seed=12).batch(5)
    assert not np.array_equal(
        other["encoder_input_tokens"], uninterrupted[5]["encoder_input_tokens"]
    )


def test_batches_hold_the_planned_chunks(setup):
    train, obj, plan = setup
    b = Batcher(train, plan, obj, 16, seed=0)
    chunk, _, _ = plan.chunks(b.local_slots(7))
    f = b.batch(7)
    for r, c in enumerate(chunk[:4]):
        raw = train.tokens(int(c) * obj.raw_length, obj.raw_length)
        non_sentinel = f["encoder_input_tokens"][r]
        non_sentinel = non_sentinel[(non_sentinel > 1) & (non_sentinel < VOCAB.sentinel(99))]
        assert np.isin(non_sentinel, raw).all()


def test_accounting_matches_the_plan(setup):
    train, obj, plan = setup
    b = Batcher(train, plan, obj, 16, seed=0)
    total_rep = 0
    for s in range(b.num_steps):
        a = b.accounting(s)
        assert a["repeated_tokens"] + a["unique_tokens"] == 16 * obj.raw_length
        total_rep += a["repeated_examples"]
    assert total_rep == plan.summary()["repeated_slots"]


def test_prefetch_errors_reach_the_consumer_and_close_stops_threads():
    class Broken(ArraySplit):
        broken = True

        def tokens(self, start, length):
            if self.broken:
                raise OSError("disk went away")
            return super().tokens(start, length)

    obj = pipeline.make_objective("causal_lm", VOCAB, "decoder_only", length=64)
    split = Broken(np.random.default_rng(0).integers(3, 259, size=64 * 400))
    plan = pipeline.build_plan(split, obj, 10, 8, 0.0, 1, 0)
    b = Batcher(split, plan, obj, 8, seed=0)
    with pytest.raises(OSError, match="disk went away"):
        for _ in b.iter_from(0):
            pass
    split.broken = False
    it = b.iter_from(0)
    assert _same(next(it), b.batch(0))
    b.close()
    it.close()
    assert len(list(b.iter_from(b.num_steps))) == 0


def test_build_plan_and_errors(setup):
    train, obj, _ = setup
    need = 10_000 * 64 * obj.raw_length
    with pytest.raises(
        RepetitionPlanError,
        match=rf"needs .*{need} tokens.*{train.num_tokens // obj.raw_length * obj.raw_length} tokens",
    ):
        pipeline.build_plan(train, obj, 10_000, 64, 0.0, 1, 0)
    plan = pipeline.build_plan(train, obj, 4, 16, 0.5, 2, 0)
    with pytest.raises(BatcherError, match="not divisible by process_count=3"):
        Batcher(train, plan, obj, 16, 0, 0, 3)
    with pytest.raises(BatcherError, match=r"step 4 outside \[0, 4\)"):
        Batcher(train, plan, obj, 16, 0).batch(4)
    with pytest.raises(BatcherError, match=r"process_index=2 must be in \[0, 2\)"):
        Batcher(train, plan, obj, 16, 0, 2, 2)


def test_heldout_and_chunk_batches(store, setup):
    train, obj, plan = setup
    val = store.split("validation")
    a = pipeline.heldout_batches(val, obj, 8, 3, seed=0)
    b = pipeline.heldout_batches(val, obj, 8, 3, seed=0)
    assert len(a) == 3 and all(_same(x, y) for x, y in zip(a, b))
    with pytest.raises(BatcherError, match="held-out split too small"):
        pipeline.heldout_batches(val, obj, 10_000, 100, seed=0)
    rep = plan.repeated_chunks()
    batches = pipeline.chunk_batches(train, rep, obj, 16, seed=0)
    assert len(batches) == -(-len(rep) // 16)
    last = batches[-1]
    n_real = len(rep) - 16 * (len(batches) - 1)
    assert last["encoder_input_tokens"].shape[0] == 16
    assert not last["decoder_loss_weights"][n_real:].any()
    assert last["decoder_loss_weights"][:n_real].any(axis=1).all()
    with pytest.raises(BatcherError, match="chunk id"):
        pipeline.chunk_batches(train, [10**9], obj, 4, 0)


def test_data_path_imports_no_jax_or_tensorflow():
    code = (
        "import sys; import repeat_scaling.data.pipeline, repeat_scaling.data.batcher;"
        "bad = [m for m in ('jax', 'tensorflow', 'seqio', 'tensorflow_datasets') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
