"""Packing: rows with segment ids/positions, document splitting, packed objectives."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repeat_scaling.data import packing
from repeat_scaling.data.batcher import read_chunks
from repeat_scaling.data.objectives import make_objective
from repeat_scaling.data.vocab import load_vocab_info

VOCAB = load_vocab_info("byte")
FIRST_SENTINEL = VOCAB.vocab_size - VOCAB.extra_ids


def test_pack_into_row_segments_positions_and_overflow():
    row = packing.pack_into_row(
        [{"tokens": np.array([5, 6, 7])}, {"tokens": np.array([8, 9])}], length=8
    )
    assert row["tokens"].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert packing.packing_efficiency(row["segment_ids"]) == pytest.approx(5 / 8)
    with pytest.raises(packing.PackingOverflow, match="5 tokens > row length 4"):
        packing.pack_into_row([{"tokens": np.arange(5)}], length=4)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), length=st.integers(8, 64))
def test_pack_sequences_roundtrip(lengths, length):
    rng = np.random.default_rng(len(lengths))
    seqs = [rng.integers(3, 300, size=n) for n in lengths]
    out = packing.pack_sequences(seqs, length)
    # Unpack by segments and compare with the (length-split) inputs in order.
    pieces = []
    for toks, seg in zip(out["tokens"], out["segment_ids"]):
        for s in range(1, seg.max() + 1):
            pieces.append(toks[seg == s])
    expected = [s[i : i + length] for s in seqs for i in range(0, len(s), length)]
    assert len(pieces) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(pieces, expected))
    assert np.all((out["positions"] == 0) | (out["segment_ids"] > 0))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.lists(st.integers(1, 12), max_size=4), min_size=1, max_size=8),
    width=st.integers(1, 40),
)
def test_pack_rows_matches_row_by_row_packing(lengths, width):
    rng = np.random.default_rng(7)
    rows = [[rng.integers(3, 300, size=n) for n in r] for r in lengths]
    if any(sum(r) > width for r in lengths):
        with pytest.raises(packing.PackingOverflow, match=f"> {width}"):
            packing.pack_rows(rows, width)
        return
    out = packing.pack_rows(rows, width)
    for r, row in enumerate(rows):
        ref = packing.pack_into_row([{"tokens": e} for e in row], width) if row else None
        for k in ("tokens", "segment_ids", "positions"):
            expected = ref[k] if ref else np.zeros(width, np.int32)
            assert np.array_equal(out[k][r], expected)
    flat = [e for row in rows for e in row]
    idx = out["example_index"]
    assert np.all((idx >= 0) == (out["segment_ids"] > 0))
    for i, e in enumerate(flat):
        assert np.array_equal(out["tokens"][idx == i], e)


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.integers(1, 6), min_size=1, max_size=80))
def test_split_documents_covers_the_chunk(tokens):
    tokens = np.array(tokens)
    pieces = packing.split_documents(tokens, eos_id=1, min_length=2)
    assert np.array_equal(np.concatenate(pieces), tokens)
    if (tokens != 1).sum() >= 2:
        assert all((p != 1).sum() >= 2 for p in pieces)
    else:
        assert len(pieces) == 1
    # Every EOS but a piece's last token was merged in from a too-short document.
    assert sum(int(p[-1] == 1) for p in pieces) <= int((tokens == 1).sum())


@pytest.fixture(scope="module")
def c4_train(c4_byte_store):
    return c4_byte_store.split("train")


def _segments(tokens, seg):
    return [tokens[seg == s] for s in range(1, seg.max() + 1)]


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_packed_span_corruption_keeps_documents_apart(c4_train, arch):
    kw = {"inputs_length": 512} if arch == "encoder_decoder" else {"length": 512}
    obj = make_objective("span_corruption", VOCAB, arch, pack=True, **kw)
    # Chunks that hold several documents (short c4 docs).
    offs = c4_train.document_offsets
    ids = np.unique(offs // obj.raw_length)
    ids = ids[ids < c4_train.num_tokens // obj.raw_length][:48]
    chunks = read_chunks(c4_train, ids, obj.raw_length)
    f = obj(chunks, ids, seed=3)
    multi = 0
    for r in range(len(ids)):
        docs = packing.split_documents(chunks[r], VOCAB.eos_id)
        if arch == "encoder_decoder":
            ins = _segments(f["encoder_input_tokens"][r], f["encoder_segment_ids"][r])
            tgs = _segments(f["decoder_target_tokens"][r], f["decoder_segment_ids"][r])
            assert np.array_equal(
                f["decoder_positions"][r][f["decoder_segment_ids"][r] == 1],
                np.arange(len(tgs[0])),
            )
            # Decoder inputs restart with 0 at every segment start.
            starts = (f["decoder_positions"][r] == 0) & (f["decoder_segment_ids"][r] > 0)
            assert np.all(f["decoder_input_tokens"][r][starts] == 0)
        else:
            seq, seg = f["decoder_target_tokens"][r], f["decoder_segment_ids"][r]
            ins, tgs = [], []
            for k, s in enumerate(_segments(seq, seg), start=1):
                n_in = int(np.argmax(s == 1)) + 1
                ins.append(s[:n_in])
                tgs.append(s[n_in:])
                # Prefix-LM masks per segment: loss on the targets, bidirectional on the
                # inputs plus one position (T5X), inputs shifted right from 0.
                at = seg == k
                w, c = f["decoder_loss_weights"][r][at], f["decoder_causal_attention"][r][at]
                assert np.all(w[:n_in] == 0) and np.all(w[n_in:] == 1)
                assert np.all(c[: n_in + 1] == 1) and np.all(c[n_in + 1 :] == 0)
                dec_in = f["decoder_input_tokens"][r][at]
                assert dec_in[0] == 0 and np.array_equal(dec_in[1:], s[:-1])
            assert not f["decoder_loss_weights"][r][seg == 0].any()
        if len(ins) == 1 and len(docs) > 1:
            continue  # overflow fallback: whole chunk as one example
        assert len(ins) == len(tgs) == len(docs)
        multi += len(docs) > 1
        for doc, i, t in zip(docs, ins, tgs):
            body = doc[:-1] if doc[-1] == VOCAB.eos_id else doc
            recon = []
            spans, cur = {}, None
            for tok in t[:-1]:
                if tok >= FIRST_SENTINEL:
                    cur = tok
                    spans[cur] = []
                else:
                    spans[cur].append(tok)
            for tok in i[:-1]:
                recon.extend(spans[tok] if tok >= FIRST_SENTINEL else [tok])
            assert recon == body.tolist()
    assert multi > 5
    seg_key = "encoder_segment_ids" if arch == "encoder_decoder" else "decoder_segment_ids"
    assert 0.5 < packing.packing_efficiency(f[seg_key]) <= 1.0


def test_packed_overflow_falls_back_to_one_example():
    obj = make_objective("span_corruption", VOCAB, "encoder_decoder", inputs_length=64, pack=True)
    chunk = np.tile(np.array([5, 6, 1]), obj.raw_length // 3 + 1)[: obj.raw_length][None]
    f = obj(chunk, np.array([0]), seed=0)  # 2-token docs: sentinels+EOS would overflow
    assert f["encoder_segment_ids"].max() == 1
    assert f["decoder_segment_ids"].max() == 1


def test_packed_causal_lm_segments_follow_documents():
    obj = make_objective("causal_lm", VOCAB, "decoder_only", length=12, pack=True)
    chunk = np.array([[5, 6, 1, 7, 8, 9, 1, 10, 11, 12, 13, 14]])
    f = obj(chunk, np.array([0]), seed=0)
    assert f["decoder_segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3]
    assert f["decoder_positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert f["decoder_input_tokens"][0].tolist() == [0, 5, 6, 0, 7, 8, 9, 0, 10, 11, 12, 13]
    assert packing.packing_efficiency(f["decoder_segment_ids"]) == 1.0


def test_packed_ul2_rows_have_mode_tokens_per_segment(c4_train):
    obj = make_objective(
        "ul2", VOCAB, "encoder_decoder", inputs_length=256, targets_length=256, pack=True
    )
    ids = np.arange(40)
    f = obj(read_chunks(c4_train, ids, obj.raw_length), ids, seed=0)
    starts = (f["encoder_positions"] == 0) & (f["encoder_segment_ids"] > 0)
    modes = f["encoder_input_tokens"][starts]
    assert np.isin(modes, [FIRST_SENTINEL, FIRST_SENTINEL + 1, FIRST_SENTINEL + 2]).all()
