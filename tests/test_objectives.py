"""Objectives: T5 length table, span statistics, sentinels, exact reconstruction, UL2, LMs."""

import numpy as np
import pytest

from repeat_scaling.data.batcher import read_chunks
from repeat_scaling.data.objectives import ObjectiveError, make_objective
from repeat_scaling.data.slot_rng import example_rng
from repeat_scaling.data.span_corruption import (
    noise_mask_batch,
    span_corruption_lengths,
    span_uniforms_needed,
)
from repeat_scaling.data.vocab import load_vocab_info

VOCAB = load_vocab_info("byte")
FIRST_SENTINEL = VOCAB.vocab_size - VOCAB.extra_ids


@pytest.fixture(scope="module")
def c4_train(c4_byte_store):
    return c4_byte_store.split("train")


def _chunks(split, obj, n, offset=0):
    return read_chunks(split, np.arange(offset, offset + n), obj.raw_length)


def _reconstruct(inputs, targets):
    """Invert span corruption: fill every sentinel of the inputs with its target span."""
    inputs = np.trim_zeros(inputs, "b")[:-1]  # drop padding and the final EOS
    targets = np.trim_zeros(targets, "b")[:-1]
    spans, cur = {}, None
    for t in targets:
        if t >= FIRST_SENTINEL:
            cur = int(t)
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    out = []
    for t in inputs:
        out.extend(spans[int(t)] if t >= FIRST_SENTINEL else [int(t)])
    return out


@pytest.mark.parametrize(
    "density, span, raw, targets",
    [
        (0.15, 3.0, 568, 114),
        (0.15, 8.0, 588, 100),
        (0.15, 64.0, 600, 92),
        (0.5, 3.0, 766, None),
        (0.5, 8.0, 908, None),
        (0.5, 64.0, 1006, None),
    ],
)
def test_reference_length_table(density, span, raw, targets):
    got_raw, got_targets = span_corruption_lengths(512, density, span)
    assert got_raw == raw
    if targets is not None:
        assert got_targets == targets


def test_span_corruption_statistics_over_10k_examples():
    obj = make_objective("span_corruption", VOCAB, "encoder_decoder", inputs_length=512)
    rng = np.random.default_rng(0)
    chunks = rng.integers(3, 259, size=(10_000, obj.raw_length))
    f = obj(chunks, np.arange(10_000), seed=1)
    tg = f["decoder_target_tokens"]
    is_sent = tg >= FIRST_SENTINEL
    noise = ((tg > 1) & ~is_sent).sum()
    spans = is_sent.sum()
    assert noise / chunks.size == pytest.approx(0.15, rel=0.02)
    assert noise / spans == pytest.approx(3.0, rel=0.02)
    # Span lengths really vary (random segmentation), with the configured mean.
    span_lengths = np.diff(np.flatnonzero(is_sent[0] | (tg[0] == 1)))[:-1] - 1
    assert span_lengths.min() >= 1 and span_lengths.max() > 3


def test_span_corruption_on_real_text_reconstructs_and_orders_sentinels(c4_train):
    obj = make_objective("span_corruption", VOCAB, "encoder_decoder", inputs_length=512)
    chunks = _chunks(c4_train, obj, 64)
    f = obj(chunks, np.arange(64) + 1000, seed=7)
    assert f["encoder_input_tokens"].shape == (64, 512)
    assert f["decoder_target_tokens"].shape == (64, 114)
    for r in range(64):
        inp, tgt = f["encoder_input_tokens"][r], f["decoder_target_tokens"][r]
        assert _reconstruct(inp, tgt) == chunks[r].tolist()
        s_in = inp[inp >= FIRST_SENTINEL]
        s_tg = tgt[tgt >= FIRST_SENTINEL]
        expected = VOCAB.vocab_size - 1 - np.arange(len(s_in))
        assert np.array_equal(s_in, expected) and np.array_equal(s_tg, expected)
        assert tgt[0] == VOCAB.sentinel(0)
        assert inp[np.count_nonzero(inp) - 1] == VOCAB.eos_id
        assert tgt[np.count_nonzero(tgt) - 1] == VOCAB.eos_id
    # decoder inputs are the targets shifted right, starting with 0; weights on non-pad.
    assert np.all(f["decoder_input_tokens"][:, 0] == 0)
    assert np.array_equal(f["decoder_input_tokens"][:, 1:], f["decoder_target_tokens"][:, :-1])
    assert np.array_equal(f["decoder_loss_weights"], (f["decoder_target_tokens"] > 0) * 1.0)


def test_noise_is_keyed_by_slot_not_by_chunk():
    obj = make_objective("span_corruption", VOCAB, "encoder_decoder", inputs_length=64)
    chunk = np.random.default_rng(1).integers(3, 259, size=(1, obj.raw_length))
    two = np.repeat(chunk, 2, axis=0)
    a = obj(two, np.array([5, 6]), seed=0)["encoder_input_tokens"]
    b = obj(two, np.array([5, 6]), seed=0)["encoder_input_tokens"]
    c = obj(two, np.array([5, 6]), seed=1)["encoder_input_tokens"]
    assert np.array_equal(a, b)  # reproducible
    assert not np.array_equal(a[0], a[1])  # fresh noise for every repetition (slot)
    assert not np.array_equal(a, c)  # and per seed


def test_noise_mask_matches_t5_counts_and_starts_with_nonnoise():
    for length in (2, 3, 10, 100, 568):
        m = span_uniforms_needed(length, 0.15, 3.0)
        u = np.stack([example_rng(0, s).random(m) for s in range(50)])
        mask = noise_mask_batch(u, length, 0.15, 3.0)
        n_noise = min(max(round(max(length, 2) * 0.15), 1), max(length, 2) - 1)
        assert mask.shape == (50, length) and not mask[:, 0].any()
        if length >= 2:
            assert np.all(mask.sum(axis=1) == n_noise)


def test_decoder_only_span_corruption_is_a_prefix_lm():
    obj = make_objective("span_corruption", VOCAB, "decoder_only", length=256)
    chunks = np.random.default_rng(2).integers(3, 259, size=(8, obj.raw_length))
    f = obj(chunks, np.arange(8), seed=0)
    for r in range(8):
        seq, w = f["decoder_target_tokens"][r], f["decoder_loss_weights"][r]
        causal = f["decoder_causal_attention"][r]
        n_in = int(np.argmax(seq == 1)) + 1  # inputs end at their EOS
        assert np.all(w[:n_in] == 0) and np.all(w[n_in : np.count_nonzero(seq)] == 1)
        assert np.all(causal[: n_in + 1] == 1) and np.all(causal[n_in + 1 :] == 0)
        assert _reconstruct(seq[:n_in], seq[n_in:]) == chunks[r].tolist()
    assert np.array_equal(f["decoder_input_tokens"][:, 1:], f["decoder_target_tokens"][:, :-1])


def test_ul2_rates_mode_tokens_and_sentinels():
    obj = make_objective("ul2", VOCAB, "encoder_decoder", inputs_length=128, targets_length=128)
    n = 10_000
    chunks = np.random.default_rng(3).integers(3, 259, size=(n, obj.raw_length))
    f = obj(chunks, np.arange(n), seed=4)
    which = obj.choices(np.arange(n), seed=4)
    rates = np.array([d.rate for d in obj.denoisers])
    rates /= rates.sum()
    counts = np.bincount(which, minlength=len(rates))
    sigma = np.sqrt(n * rates * (1 - rates))
    assert np.all(np.abs(counts - n * rates) < 4 * sigma)
    nlu, nlg, s2s = (VOCAB.sentinel(VOCAB.extra_ids - 1 - i) for i in range(3))
    assert (nlu, nlg, s2s) == (FIRST_SENTINEL, FIRST_SENTINEL + 1, FIRST_SENTINEL + 2)
    mode = f["encoder_input_tokens"][:, 0]
    expected_mode = np.array([{"R": nlu, "X": nlg, "S": s2s}[obj.denoisers[k].name] for k in which])
    assert np.array_equal(mode, expected_mode)  # the produced rows follow the chosen denoiser
    for name, tok in (("R", nlu), ("X", nlg), ("S", s2s)):
        rate = rates[[d.name == name for d in obj.denoisers]].sum()
        assert abs((mode == tok).mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    # Sentinels never collide with mode tokens; denoisers reconstruct exactly.
    body = f["encoder_input_tokens"][:, 1:]
    assert not np.isin(body, [nlu, nlg, s2s]).any()
    assert not np.isin(f["decoder_target_tokens"], [nlu, nlg, s2s]).any()
    for r in range(200):
        d = obj.denoisers[which[r]]
        inp, tgt = f["encoder_input_tokens"][r, 1:], f["decoder_target_tokens"][r]
        if d.is_span:
            assert _reconstruct(inp, tgt) == chunks[r].tolist()
            n_noise = ((tgt > 1) & (tgt < FIRST_SENTINEL)).sum()
            assert n_noise == round(obj.raw_length * d.noise_density)
        else:
            joined = np.concatenate([np.trim_zeros(inp, "b")[:-1], np.trim_zeros(tgt, "b")[:-1]])
            assert joined.tolist() == chunks[r].tolist()


def test_ul2_decoder_only_prefix_masks():
    obj = make_objective("ul2", VOCAB, "decoder_only", length=200)
    chunks = np.random.default_rng(5).integers(3, 259, size=(300, obj.raw_length))
    f = obj(chunks, np.arange(300), seed=0)
    seq = f["decoder_target_tokens"]
    assert np.isin(seq[:, 0], [FIRST_SENTINEL, FIRST_SENTINEL + 1, FIRST_SENTINEL + 2]).all()
    n_in = np.argmax(seq == 1, axis=1) + 1
    ar = np.arange(200)
    assert np.array_equal(f["decoder_causal_attention"], (ar <= n_in[:, None]) & (seq > 0))
    assert np.array_equal(f["decoder_loss_weights"] > 0, (ar >= n_in[:, None]) & (seq > 0))


def test_prefix_lm_both_archs_and_causal_lm():
    chunks = np.random.default_rng(6).integers(3, 259, size=(16, 100))
    ed = make_objective(
        "prefix_lm", VOCAB, "encoder_decoder", inputs_length=100, targets_length=100
    )
    assert ed.raw_length == 100
    f = ed(chunks, np.arange(16), seed=0)
    splits = set()
    for r in range(16):
        inp = np.trim_zeros(f["encoder_input_tokens"][r], "b")
        tgt = np.trim_zeros(f["decoder_target_tokens"][r], "b")
        assert inp[-1] == 1 and tgt[-1] == 1
        assert np.concatenate([inp[:-1], tgt[:-1]]).tolist() == chunks[r].tolist()
        splits.add(len(inp))
    assert len(splits) > 4  # the split point is random per example
    do = make_objective("prefix_lm", VOCAB, "decoder_only", length=102)
    g = do(chunks, np.arange(16), seed=0)
    assert g["decoder_causal_attention"].sum(axis=1).min() >= 2
    cl = make_objective("causal_lm", VOCAB, "decoder_only", length=100)
    h = cl(chunks, np.arange(16), seed=0)
    assert np.array_equal(h["decoder_target_tokens"], chunks)
    assert np.all(h["decoder_input_tokens"][:, 0] == 0)
    assert np.array_equal(h["decoder_input_tokens"][:, 1:], chunks[:, :-1])
    assert "decoder_causal_attention" not in h and np.all(h["decoder_loss_weights"] == 1)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: make_objective("mlm", VOCAB, "encoder_decoder"), "unknown objective 'mlm'"),
        (lambda: make_objective("causal_lm", VOCAB, "encoder_decoder", length=8), "needs arch"),
        (
            lambda: make_objective("span_corruption", VOCAB, "encoder_decoder", inputs_length=1),
            "inputs_length=1 must be an integer >= 2",
        ),
        (
            lambda: make_objective(
                "ul2", VOCAB, "encoder_decoder", inputs_length=3, targets_length=2
            ),
            "too short for objective 'ul2'",
        ),
        (
            lambda: make_objective(
                "ul2", VOCAB, "decoder_only", length=64, denoisers=[{"name": "Q", "rate": 1}]
            ),
            "unknown denoiser name 'Q'",
        ),
        (
            lambda: make_objective(
                "ul2",
                VOCAB,
                "encoder_decoder",
                inputs_length=512,
                targets_length=512,
                denoisers=[{"name": "X", "noise_density": 0.5, "mean_noise_span_length": 1.0}],
            ),
            r"needs \d+ sentinels per example .* only 97 remain",
        ),
        (
            lambda: make_objective(
                "span_corruption", VOCAB, "encoder_decoder", inputs_length=64, noise_density=1.5
            ),
            "noise_density=1.5 must be in",
        ),
        (
            lambda: make_objective("causal_lm", VOCAB, "decoder_only", length=64, bogus=1),
            r"unknown objective options \['bogus'\]",
        ),
    ],
)
def test_clear_errors(call, match):
    with pytest.raises(ObjectiveError, match=match):
        call()
