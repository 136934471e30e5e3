"""Probe math on hand-made attention patterns and weight matrices (no model needed)."""

import numpy as np
import pytest

from repeat_scaling.eval import probes


def _uniform_causal(b, h, n):
    att = np.tril(np.ones((n, n)))
    att /= att.sum(-1, keepdims=True)
    return np.broadcast_to(att, (b, h, n, n)).copy()


def _induction_pattern(n, period, offset=1):
    """Each query in a repeat attends to the token after its previous occurrence."""
    att = np.zeros((n, n))
    for i in range(n):
        j = i - period + 1
        att[i, j if i >= offset + period else i] = 1.0
    return att


def _prev_pattern(n):
    att = np.zeros((n, n))
    att[0, 0] = 1.0
    att[np.arange(1, n), np.arange(n - 1)] = 1.0
    return att


def test_probe_sequences_structure_and_candidates():
    counts = np.zeros(359, np.int64)
    counts[3:259] = np.arange(1, 257)  # byte ids, strictly increasing frequency
    counts[1] = 10_000  # EOS: special, excluded whatever its count
    cand = probes.probe_candidates(counts, exclude_ids=(0, 1, 2), exclude_fraction=0.05)
    drop = round(0.05 * 256)
    assert cand.size == 256 - 2 * drop
    assert 3 not in cand and 258 not in cand and 1 not in cand  # least/most common gone
    seqs = probes.repeated_random_sequences(cand, num_sequences=12, period=25, repeats=4, seed=3)
    assert seqs.shape == (12, 101) and seqs.dtype == np.int32
    assert (seqs[:, 0] == 0).all()
    body = seqs[:, 1:].reshape(12, 4, 25)
    assert (body == body[:, :1]).all()  # 4 identical repeats
    assert all(len(set(r)) == 25 for r in body[:, 0])  # distinct tokens
    assert np.isin(body, cand).all()
    np.testing.assert_array_equal(
        seqs, probes.repeated_random_sequences(cand, num_sequences=12, seed=3)
    )
    with pytest.raises(probes.ProbeError, match="need >= 25"):
        probes.probe_candidates(counts[:28])


def test_prefix_matching_separates_induction_from_other_heads():
    n, period = 101, 25
    att = np.stack(
        [_induction_pattern(n, period), _prev_pattern(n), _uniform_causal(1, 1, n)[0, 0]]
    )
    att = np.broadcast_to(att, (3, 3, n, n))  # [batch, heads, q, k]
    scores = probes.prefix_matching_scores([att, att[:, ::-1]], period=period)
    assert scores.shape == (2, 3)
    np.testing.assert_allclose(scores[0, 0], 1.0)
    assert scores[0, 1] == 0.0  # previous-token head never looks ahead of the match
    assert scores[0, 2] < 0.1  # diffuse head
    np.testing.assert_allclose(scores[1], scores[0][::-1])


def test_prefix_matching_counts_all_earlier_occurrences():
    n, period = 1 + 3 * 4, 4
    att = np.zeros((1, 1, n, n))
    mask = probes.prefix_matching_mask(n, period)
    for i in range(n):  # spread attention evenly over every "next of earlier occurrence"
        if mask[i].sum():
            att[0, 0, i] = mask[i] / mask[i].sum()
        else:
            att[0, 0, i, 0] = 1.0
    np.testing.assert_allclose(probes.prefix_matching_scores(att, period=period), [[1.0]])
    # Query 9 (3rd repeat, offset 0) pairs with keys 6 and 2 (after occurrences at 5 and 1).
    assert set(np.nonzero(mask[9])[0]) == {6, 2}


def test_previous_token_scores_with_padding():
    n = 10
    att = np.stack([_prev_pattern(n), _uniform_causal(1, 1, n)[0, 0]])[None]  # [1, 2, n, n]
    scores = probes.previous_token_scores(att)
    np.testing.assert_allclose(scores[0, 0], 1.0)
    np.testing.assert_allclose(scores[0, 1], np.mean(1.0 / np.arange(2, n + 1)))
    # Padded tail: only the first 4 positions are real.
    qmask = np.zeros((1, n))
    qmask[0, :4] = 1
    pad_att = att.copy()
    pad_att[0, 0, 4:] = 0.0  # garbage on padding must not count
    np.testing.assert_allclose(probes.previous_token_scores(pad_att, qmask)[0, 0], 1.0)


def test_cross_prefix_matching():
    src, lt = 12, 12
    diag = np.eye(lt, src)[None, None]
    shifted = np.roll(np.eye(lt, src), -1, axis=1)[None, None]
    scores = probes.cross_prefix_matching_scores(np.concatenate([diag, shifted], 1), src)
    np.testing.assert_allclose(scores, [[1.0, 0.0]])


def test_copying_scores_identity_vs_permutation_vs_zero():
    rng = np.random.default_rng(0)
    v, d, h, dk = 50, 64, 3, 64
    emb = rng.normal(size=(v, d))
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    emb = q[:v] * 8.0  # orthogonal rows: clean one-to-one read-out
    unemb = emb.T.copy()
    wv = np.zeros((d, h, dk))
    wo = np.zeros((h, dk, d))
    wv[:, 0] = np.eye(d)
    wo[0] = np.eye(d)  # head 0: OV = identity -> copies
    wv[:, 1] = np.linalg.pinv(emb) @ np.roll(emb, 1, axis=0)  # token t -> embedding of t-1
    wo[1] = np.eye(d)  # head 1: writes a different token -> never copies
    toks = np.arange(5, 45)
    s = probes.copying_scores(emb, wv, wo, unemb, toks)
    assert s.shape == (3,)
    assert s[0] > 0.9
    assert s[1] < -0.9
    assert s[2] == -1.0  # nothing raised at all
    assert probes.head_max([[0.1, 0.7], [0.3, -1]]) == 0.7
