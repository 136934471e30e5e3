"""RepetitionPlan and the Feistel bijection: exact counts, disjointness, errors."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repeat_scaling.data import feistel
from repeat_scaling.data.repetition import RepetitionPlan, RepetitionPlanError


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**63 - 1))
def test_feistel_is_a_bijection_and_inverts(n, seed):
    key = feistel.derive_key(seed)
    perm = feistel.permute(np.arange(n), n, key)
    assert np.array_equal(np.sort(perm), np.arange(n))
    assert np.array_equal(feistel.invert(perm, n, key), np.arange(n))


def test_feistel_depends_on_key_and_rejects_out_of_range():
    a = feistel.permute(np.arange(1000), 1000, feistel.derive_key(1))
    b = feistel.permute(np.arange(1000), 1000, feistel.derive_key(2))
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, np.arange(1000))
    with pytest.raises(ValueError, match="outside the permutation domain"):
        feistel.permute(np.array([1000]), 1000, feistel.derive_key(1))


def _all(plan):
    return plan.chunks(np.arange(plan.num_slots))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 2000),
    f=st.floats(0.0, 1.0),
    e=st.integers(1, 50),
    seed=st.integers(0, 2**32),
    spare=st.integers(0, 300),
)
def test_exact_repetition_counts(n, f, e, seed, spare):
    if f == 0.0:
        e = 1
    e = min(e, n)
    ideal = f * n / e
    if f > 0 and min(int(np.floor(ideal + 0.5)), n // e) == 0:
        with pytest.raises(RepetitionPlanError, match="rounds to 0"):
            RepetitionPlan(10**6, n, f, e, seed)
        return
    R = min(int(np.floor(ideal + 0.5)), n // e) if f > 0 else 0
    U = n - R * e
    plan = RepetitionPlan(R + U + spare, n, f, e, seed)
    assert (plan.num_repeated, plan.num_unique) == (R, U)
    chunk, rep, k = _all(plan)
    ids, counts = np.unique(chunk, return_counts=True)
    rep_ids = set(chunk[rep].tolist())
    uni_ids = set(chunk[~rep].tolist())
    assert rep_ids.isdisjoint(uni_ids)  # disjoint pools
    assert len(rep_ids) == R and len(uni_ids) == U
    assert all(c == e for c in np.unique(chunk[rep], return_counts=True)[1])
    assert all(c == 1 for c in np.unique(chunk[~rep], return_counts=True)[1])
    assert chunk.min() >= 0 and chunk.max() < plan.num_chunks
    assert np.array_equal(plan.repeated_chunks(), np.array(sorted(rep_ids), dtype=np.int64))
    # repetition index = temporal occurrence 0..E-1 of each repeated chunk.
    for c in list(rep_ids)[:5]:
        assert np.array_equal(k[chunk == c], np.arange(e))
    assert np.all(k[~rep] == 0)
    s = plan.summary()
    assert s["realised"]["repeated_fraction"] == pytest.approx(R * e / n)
    assert s["repeated_slots"] + s["unique_slots"] == n


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 1500), f=st.floats(0.01, 1.0), e=st.integers(1, 20), data=st.data())
def test_unique_seen_chunks_matches_brute_force(n, f, e, data):
    e = min(e, n)
    try:
        plan = RepetitionPlan(10 * n, n, f, e, 3)
    except RepetitionPlanError:
        return
    chunk, rep, _ = _all(plan)
    for consumed in {0, n, data.draw(st.integers(0, n))}:
        brute = np.sort(chunk[:consumed][~rep[:consumed]])
        assert np.array_equal(plan.unique_seen_chunks(consumed), brute)


def test_feistel_with_mixed_domains_matches_each_domain_alone():
    # Blocks of sizes 16 and 17 need different Feistel widths (4**2 vs 4**3 domains):
    # an element's image must not depend on the other blocks in the same call.
    x = np.array([3, 15, 3, 16, 0], dtype=np.int64)
    n = np.array([16, 16, 17, 17, 16], dtype=np.int64)
    keys = feistel.derive_key(7, np.array([0, 0, 1, 1, 0]))
    both = feistel.permute(x, n, keys)
    alone = [int(feistel.permute(np.array([xi]), int(ni), k)[0]) for xi, ni, k in zip(x, n, keys)]
    assert both.tolist() == alone
    assert feistel.invert(both, n, keys).tolist() == x.tolist()


@pytest.mark.parametrize("n,f,e", [(273, 0.5, 17), (1000, 0.3, 7)])
def test_chunks_do_not_depend_on_which_slots_share_the_call(n, f, e):
    plan = RepetitionPlan(10 * n, n, f, e, 3)
    full = plan.chunks(np.arange(n))
    for s in (0, 1, n // e, n // e + 1, n - 1):
        one = plan.chunks(np.array([s]))
        assert [int(a[s]) for a in full] == [int(a[0]) for a in one]
    # the falsifying example hypothesis found: slot 0 is repeated, so nothing unique is seen
    rep0 = bool(full[1][0])
    assert plan.unique_seen_chunks(1).size == (0 if rep0 else 1)


def test_repetitions_spread_uniformly_over_training():
    plan = RepetitionPlan(10**6, 10_000, 0.1, 10, 0)
    chunk, rep, k = _all(plan)
    # Repetition k of every repeated chunk happens in the k-th tenth of training.
    slots = np.arange(plan.num_slots)
    assert np.array_equal(slots[rep] * 10 // plan.num_slots, k[rep])
    # Repeated slots are ~10% of every window of 1000 slots.
    frac = rep.reshape(10, 1000).mean(axis=1)
    assert np.allclose(frac, 0.1, atol=0.002)


def test_f1_is_multi_epoch_training_and_f0_unique_baseline():
    plan = RepetitionPlan.from_unique_tokens(
        unique_tokens=64 * 512, epochs=8, example_tokens=512, num_chunks=1000, seed=1
    )
    assert (plan.num_repeated, plan.num_unique, plan.num_slots) == (64, 0, 512)
    chunk, rep, k = _all(plan)
    assert rep.all()
    for epoch in range(8):  # each epoch is a fresh permutation of the same 64 chunks
        assert set(chunk[k == epoch].tolist()) == set(plan.repeated_chunks().tolist())
        assert np.all(k[epoch * 64 : (epoch + 1) * 64] == epoch)
    base = RepetitionPlan(300, 300, 0.0, 1, 5)
    c, r, _ = _all(base)
    assert not r.any() and np.array_equal(np.sort(c), np.arange(300))


def test_fractional_rule_is_documented_and_reported():
    plan = RepetitionPlan(10_000, 1000, 0.1, 3, 0)  # 33.33 repeated chunks -> 33
    assert plan.num_repeated == 33 and plan.num_unique == 1000 - 99
    s = plan.summary()
    assert s["requested"] == {"repeated_fraction": 0.1, "repeated_epochs": 3, "total_tokens": 1000}
    assert s["realised"] == {"repeated_fraction": 0.099, "repeated_epochs": 3, "total_tokens": 1000}
    plan = RepetitionPlan(10_000, 1000, 1.0, 3, 0)  # f=1 leaves N mod E unique slots
    assert (plan.num_repeated, plan.num_unique) == (333, 1)


def test_from_tokens_and_summary_accounting(tmp_path):
    plan = RepetitionPlan.from_tokens(
        total_tokens=100 * 568 + 7,
        example_tokens=568,
        num_chunks=500,
        repeated_fraction=0.2,
        repeated_epochs=4,
        seed=9,
    )
    s = plan.summary()
    assert s["num_slots"] == 100 and s["total_tokens"] == 100 * 568
    assert s["requested"]["total_tokens"] == 100 * 568 + 7
    assert s["realised"]["total_tokens"] == 100 * 568
    assert s["subset_tokens"] == 5 * 568 and s["repeated_tokens"] == 20 * 568
    assert s["unique_tokens"] == 80 * 568 and s["seed"] == 9
    plan.write(tmp_path / "data_plan.json")
    assert json.loads((tmp_path / "data_plan.json").read_text()) == json.loads(json.dumps(s))


def test_huge_plan_costs_nothing():
    # 1e11 tokens of 512-token examples: ~2e8 slots; building and querying is O(batch).
    plan = RepetitionPlan.from_tokens(10**11, 512, 10**9, 0.1, 100, seed=1)
    chunk, rep, k = plan.chunks(np.arange(2048) + 123_456_789)
    assert chunk.shape == (2048,) and 0 < rep.mean() < 0.25
    assert plan.chunks(np.array([plan.num_slots - 1]))[0].shape == (1,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(repeated_fraction=1.5), r"repeated_fraction=1.5 must be in \[0, 1\]"),
        (dict(repeated_fraction=-0.1), r"repeated_fraction=-0.1 must be in \[0, 1\]"),
        (dict(repeated_epochs=0), "repeated_epochs=0 must be >= 1"),
        (dict(repeated_epochs=2.5), "whole number of epochs"),
        (dict(repeated_fraction=0.0, repeated_epochs=3), "nothing to repeat"),
        (dict(repeated_fraction=0.001, repeated_epochs=100), "rounds to 0"),
        (dict(num_slots=0), "num_slots=0 must be an integer >= 1"),
        (
            dict(num_chunks=50),
            r"corpus too small: the plan needs 100 chunks \(5000 tokens.*50 chunks \(2500 tokens\)",
        ),
    ],
)
def test_clear_errors(kwargs, match):
    args = dict(
        num_chunks=1000,
        num_slots=100,
        repeated_fraction=0.1,
        repeated_epochs=2,
        seed=0,
        chunk_length=50,
    )
    args.update(kwargs)
    if "num_chunks" in kwargs:
        args.update(repeated_fraction=0.0, repeated_epochs=1)
    with pytest.raises(RepetitionPlanError, match=match):
        RepetitionPlan(**args)


def test_slots_out_of_range_is_an_error():
    plan = RepetitionPlan(100, 10, 0.5, 2, 0)
    with pytest.raises(RepetitionPlanError, match=r"slot 10 outside the plan's \[0, 10\)"):
        plan.chunks(np.array([3, 10]))
