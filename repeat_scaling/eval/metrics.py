"""Metrics of one model (one checkpoint): losses, copying, in-context learning, probes.

All losses are natural-log cross-entropy in nats per target token, averaged over the
tokens that carry loss weight; accuracies are the fraction of those tokens whose argmax
prediction equals the target. "Position" is the 0-based index of a target token in its
sequence (decoder targets), i.e. the loss at position p predicts token p from the p
tokens before it.

The pieces they use have their own modules: the settings (``settings.EvalSettings``), the
jitted model (``runner.ModelRunner``), the hand-made sequences and held-out text rows
(``features``), the copying score read from the weights (``copying``) and the probe math
(``probes``).

Per architecture (``arch`` of the ModelConfig):

======================  ====================================  ==================================
metric                  decoder_only                          encoder_decoder (T5)
======================  ====================================  ==================================
test_loss / accuracy    held-out validation examples of the   same, i.e. the span-corruption
                        run's objective (causal / prefix LM)  loss on held-out data (Xue et al.)
repeated_loss           same objective on chunks of the       same
                        repeated subset
unique_seen_loss        same objective on unique chunks       same
                        already consumed at this step
copy_loss               loss on the last of k copies of a     encoder reads k-1 copies, the
                        held-out passage in one context       decoder writes the k-th; loss on it
random_repeat_loss      loss on the 2nd copy of a random      encoder reads the random sequence,
                        token sequence [R, R]                 decoder writes it again
loss_by_position,       causal LM loss per position on        span-corruption target positions
icl_score               held-out text of the full context     (decoder length is short)
prefix_matching         decoder self-attention on repeated    same, decoder self-attention
                        random tokens                         (encoder input = EOS only);
                                                              plus cross_prefix_matching_heads
previous_token          self-attention on held-out text       decoder self-attention on held-out
                                                              span-corruption targets
copying_score           OV circuit of every self-attention    decoder self-attention heads
                        head                                  (cross-attention reads encoder
                                                              states, not embeddings: not scored)
======================  ====================================  ==================================

Context-length rules (documented, recorded in the results where they matter):

- copy: with context ``C`` (decoder length; for T5 the encoder length holds k-1 copies),
  passage length ``p = C // k``; if ``p < copy_min_passage`` then ``k`` drops to
  ``max(2, C // copy_min_passage)``. The k actually used is ``copy_repeats_used``.
  Passages are the first ``p`` tokens of held-out documents at least ``p`` long (the
  paper's "first paragraph of a book"), else consecutive held-out chunks.
- random repeat: random sequence length ``n = min(random_repeat_length or C // 2, C // 2)``
  of tokens drawn uniformly (with replacement) from the probe candidates.
- ICL: late = min(icl_late (500), L - 1), early = min(icl_early (50), late // 2), recorded
  as ``icl_positions = [early, late]`` (with packed T5 targets, each moves down to the
  nearest position that has tokens).
- probes: period 25, 4 repeats, BOS first (101 tokens); when the context is shorter,
  repeats drop to fit (at least 2) and then the period shrinks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from repeat_scaling.data.vocab import EOS_ID
from repeat_scaling.eval import probes
from repeat_scaling.eval.copying import copying_scores_of
from repeat_scaling.eval.features import (
    Lengths,
    batched,
    decoder_features,
    encdec_features,
    pad_rows,
    passages,
    shift_right,
    text_rows,
)
from repeat_scaling.eval.runner import ModelRunner
from repeat_scaling.eval.settings import EvalSettings
from repeat_scaling.models.config import ModelConfig

# ----------------------------------------------------------------------------------------
# Aggregation helpers.
# ----------------------------------------------------------------------------------------


def _weights(feats) -> np.ndarray:
    if "decoder_loss_weights" in feats:
        return np.asarray(feats["decoder_loss_weights"], np.float64)
    return (np.asarray(feats["decoder_target_tokens"]) > 0).astype(np.float64)


def weighted_loss(
    runner: ModelRunner, batches: Sequence[dict]
) -> tuple[float | None, float | None]:
    """Token-weighted mean loss and accuracy over batches (None when no weighted token)."""
    tot_l = tot_c = tot_w = 0.0
    for feats in batches:
        loss, correct = runner.loss(feats)
        w = _weights(feats)
        tot_l += float((loss * w).sum())
        tot_c += float((correct * w).sum())
        tot_w += float(w.sum())
    if tot_w <= 0:
        return None, None
    return tot_l / tot_w, tot_c / tot_w


def loss_by_position(runner: ModelRunner, batches: Sequence[dict]) -> list[float | None]:
    """Mean loss per target position over weighted tokens (None where no token counts).

    The position is ``decoder_positions`` when the batch is packed, else the row index.
    """
    sums = counts = None
    for feats in batches:
        loss, _ = runner.loss(feats)
        w = _weights(feats)
        b, n = loss.shape
        if "decoder_segment_ids" in feats and "decoder_positions" in feats:
            pos = np.asarray(feats["decoder_positions"], np.int64)
        else:
            pos = np.broadcast_to(np.arange(n), (b, n))
        if sums is None:
            sums, counts = np.zeros(n), np.zeros(n)
        np.add.at(sums, pos.ravel(), (loss * w).ravel())
        np.add.at(counts, pos.ravel(), w.ravel())
    if sums is None:
        return []
    return [float(s / c) if c > 0 else None for s, c in zip(sums, counts)]


def icl_positions(length: int, early: int = 50, late: int = 500) -> tuple[int, int]:
    """(early, late) positions for the ICL score in a context of ``length`` targets."""
    if length < 3:
        raise ValueError(f"ICL score needs a context of >= 3 tokens, got {length}")
    lt = min(late, length - 1)
    return min(early, lt // 2), lt


# ----------------------------------------------------------------------------------------
# The metrics.
# ----------------------------------------------------------------------------------------


def copy_layout(context: int, k: int, min_passage: int) -> tuple[int, int]:
    """(k used, passage length) for k copies in ``context`` tokens (rule in module doc)."""
    p = context // k
    if p < min_passage:
        k = max(2, context // min_passage)
        p = context // k
    if p < 1:
        raise ValueError(f"context of {context} tokens cannot hold {k} copies of a passage")
    return k, p


def copy_loss(runner, cfg, lengths: Lengths, heldout, s: EvalSettings) -> dict[str, Any]:
    """Loss on the last copy of a held-out passage repeated k times in context."""
    if cfg.arch == "decoder_only":
        k, p = copy_layout(lengths.decoder, s.copy_repeats, s.copy_min_passage)
        psg = passages(heldout, p, s.copy_examples)
        rows = np.tile(psg, (1, k))
        targets = pad_rows(list(rows), lengths.decoder)
        weights = np.zeros_like(targets, np.float32)
        weights[:, (k - 1) * p : k * p] = 1.0
        batches = [
            decoder_features(targets[sl], weights[sl]) for sl in batched(len(targets), s.batch_size)
        ]
    else:
        # Encoder holds k-1 copies (+EOS); the decoder writes the k-th copy.
        k, p = copy_layout(lengths.encoder - 1, s.copy_repeats - 1, s.copy_min_passage)
        k += 1
        p = min(p, lengths.decoder)
        psg = passages(heldout, p, s.copy_examples)
        enc = pad_rows([np.append(np.tile(r, k - 1), EOS_ID) for r in psg], lengths.encoder)
        dec = pad_rows(list(psg), lengths.decoder)
        w = (dec > 0).astype(np.float32)
        batches = [
            encdec_features(enc[sl], dec[sl], w[sl]) for sl in batched(len(dec), s.batch_size)
        ]
    loss, _ = weighted_loss(runner, batches)
    return {"copy_loss": loss, "copy_repeats_used": k, "copy_passage_length": p}


def random_repeat_loss(runner, cfg, lengths: Lengths, candidates, s: EvalSettings):
    """Loss on the second copy of a random token sequence."""
    rng = np.random.default_rng([s.seed, 0x5EED])
    if cfg.arch == "decoder_only":
        half = lengths.decoder // 2
        n = min(s.random_repeat_length or half, half)
        seqs = rng.choice(candidates, size=(s.random_repeat_examples, n))
        targets = pad_rows(list(np.tile(seqs, (1, 2))), lengths.decoder)
        weights = np.zeros_like(targets, np.float32)
        weights[:, n : 2 * n] = 1.0
        batches = [
            decoder_features(targets[sl], weights[sl]) for sl in batched(len(targets), s.batch_size)
        ]
    else:
        cap = min(lengths.encoder - 1, lengths.decoder)
        n = min(s.random_repeat_length or cap, cap)
        seqs = rng.choice(candidates, size=(s.random_repeat_examples, n))
        enc = pad_rows([np.append(r, EOS_ID) for r in seqs], lengths.encoder)
        dec = pad_rows(list(seqs), lengths.decoder)
        w = (dec > 0).astype(np.float32)
        batches = [
            encdec_features(enc[sl], dec[sl], w[sl]) for sl in batched(len(dec), s.batch_size)
        ]
    loss, _ = weighted_loss(runner, batches)
    return {"random_repeat_loss": loss, "random_repeat_length": n}


def icl_and_position_loss(runner, cfg, lengths: Lengths, heldout, test_batches, s):
    """Loss by position and the ICL score (loss at the late minus the early position)."""
    if cfg.arch == "decoder_only":
        rows = text_rows(heldout, lengths.decoder, s.icl_examples)
        w = np.ones_like(rows, np.float32)
        batches = [decoder_features(rows[sl], w[sl]) for sl in batched(len(rows), s.batch_size)]
    else:
        batches = test_batches
    lbp = loss_by_position(runner, batches)
    early, late = icl_positions(len(lbp), s.icl_early, s.icl_late)
    # Packed rows may leave late positions without any token: use the nearest position
    # below that has one (recorded in icl_positions).
    valid = [i for i, v in enumerate(lbp) if v is not None]
    below = [i for i in valid if i <= late]
    icl = None
    if below:
        late = below[-1]
        early = min(early, late // 2)
        early_ok = [i for i in valid if i <= early]
        if early_ok and early_ok[-1] < late:
            early = early_ok[-1]
            icl = lbp[late] - lbp[early]
    return {"loss_by_position": lbp, "icl_score": icl, "icl_positions": [early, late]}


def probe_layout(context: int, period: int, repeats: int) -> tuple[int, int]:
    """(period, repeats) of probe sequences fitting ``context`` (BOS + period*repeats)."""
    while repeats > 2 and 1 + period * repeats > context:
        repeats -= 1
    if 1 + period * repeats > context:
        period = (context - 1) // repeats
    if period < 2:
        raise ValueError(f"context of {context} tokens too short for probe sequences")
    return period, repeats


def probe_scores(runner, cfg, lengths: Lengths, heldout, candidates, test_batches, s):
    """Prefix-matching, previous-token (and T5 cross prefix-matching) scores per head."""
    period, repeats = probe_layout(lengths.decoder, s.probe_period, s.probe_repeats)
    seqs = probes.repeated_random_sequences(
        candidates, s.probe_sequences, period, repeats, seed=s.seed
    )
    # seqs[:, 0] is BOS = decoder start id, so the probe sequence IS the decoder input.
    targets = pad_rows([np.append(r[1:], r[-1]) for r in seqs], lengths.decoder)
    dec_in = shift_right(targets)
    dec_in[:, : seqs.shape[1]] = seqs
    out: dict[str, Any] = {"probe_period": period, "probe_repeats": repeats}
    pm = []
    for sl in batched(len(seqs), s.batch_size):
        if cfg.arch == "decoder_only":
            f = decoder_features(targets[sl], np.ones_like(targets[sl], np.float32))
        else:
            enc = np.zeros((sl.stop - sl.start, lengths.encoder), np.int32)
            enc[:, 0] = EOS_ID
            f = encdec_features(enc, targets[sl], np.ones_like(targets[sl], np.float32))
        f["decoder_input_tokens"] = dec_in[sl]
        att = runner.attention(f)["self"]
        n = seqs.shape[1]
        pm.append(
            (
                probes.prefix_matching_scores([a[:, :, :n, :n] for a in att], period),
                sl.stop - sl.start,
            )
        )
    out["prefix_matching_heads"] = _weighted_mean(pm)

    # Previous-token score on real text.
    pt = []
    if cfg.arch == "decoder_only":
        n = min(lengths.decoder, s.previous_token_length)
        rows = text_rows(heldout, n, s.probe_sequences)
        for sl in batched(len(rows), s.batch_size):
            f = decoder_features(rows[sl], np.ones_like(rows[sl], np.float32))
            att = runner.attention(f)["self"]
            pt.append((probes.previous_token_scores(att, f["decoder_segment_ids"]), 1.0))
    else:
        for f in test_batches[:2]:
            att = runner.attention(f)["self"]
            qmask = (np.asarray(f["decoder_target_tokens"]) > 0).astype(np.float64)
            pt.append((probes.previous_token_scores(att, qmask), float(qmask.sum())))
    out["previous_token_heads"] = _weighted_mean(pt)

    if cfg.arch == "encoder_decoder":
        n = min(lengths.encoder - 1, lengths.decoder)
        rng = np.random.default_rng([s.seed, 0xC2055])
        rows = (
            np.stack(
                [rng.choice(candidates, size=n, replace=False) for _ in range(s.probe_sequences)]
            )
            if candidates.size >= n
            else rng.choice(candidates, size=(s.probe_sequences, n))
        )
        enc = pad_rows([np.append(r, EOS_ID) for r in rows], lengths.encoder)
        dec = pad_rows(list(rows), lengths.decoder)
        cp = []
        for sl in batched(len(rows), s.batch_size):
            f = encdec_features(enc[sl], dec[sl], np.ones_like(dec[sl], np.float32))
            att = runner.attention(f)["cross"]
            if att:
                cp.append((probes.cross_prefix_matching_scores(att, n), sl.stop - sl.start))
        out["cross_prefix_matching_heads"] = _weighted_mean(cp) if cp else None
    return out


def _weighted_mean(parts) -> list | None:
    if not parts:
        return None
    tot = sum(w for _, w in parts)
    return (sum(np.asarray(a) * w for a, w in parts) / tot).tolist()


# ----------------------------------------------------------------------------------------
# Everything for one checkpoint.
# ----------------------------------------------------------------------------------------


def evaluate_model(
    runner: ModelRunner,
    model,
    cfg: ModelConfig,
    lengths: Lengths,
    *,
    test_batches: Sequence[dict],
    repeated_batches: Sequence[dict] | None,
    unique_seen_batches: Sequence[dict] | None,
    heldout,
    candidates: np.ndarray,
    settings: EvalSettings,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """All metrics of one model as a results.jsonl record (without step / token counts)."""
    t0 = time.perf_counter()
    tokens0 = runner.tokens_processed
    s = settings
    rec: dict[str, Any] = {}
    rec["test_loss"], rec["test_accuracy"] = weighted_loss(runner, test_batches)
    rec["repeated_loss"], rec["repeated_accuracy"] = (
        weighted_loss(runner, repeated_batches) if repeated_batches else (None, None)
    )
    rec["unique_seen_loss"], rec["unique_seen_accuracy"] = (
        weighted_loss(runner, unique_seen_batches) if unique_seen_batches else (None, None)
    )
    rec.update(copy_loss(runner, cfg, lengths, heldout, s))
    rec.update(random_repeat_loss(runner, cfg, lengths, candidates, s))
    rec.update(icl_and_position_loss(runner, cfg, lengths, heldout, test_batches, s))
    rec.update(probe_scores(runner, cfg, lengths, heldout, candidates, test_batches, s))
    try:
        rec["copying_score_heads"] = copying_scores_of(model, cfg, candidates, vocab_size)
    except (KeyError, TypeError, IndexError, ValueError) as e:  # unknown parameter layout
        rec["copying_score_heads"] = None
        rec["copying_score_error"] = f"{type(e).__name__}: {e}"
    rec["prefix_matching"] = probes.head_max(rec["prefix_matching_heads"])
    rec["previous_token"] = probes.head_max(rec["previous_token_heads"])
    rec["copying_score"] = probes.head_max(rec["copying_score_heads"])
    if cfg.arch == "encoder_decoder":
        rec["cross_prefix_matching"] = probes.head_max(rec.get("cross_prefix_matching_heads"))
    rec["eval_time_s"] = time.perf_counter() - t0
    rec["eval_tokens"] = runner.tokens_processed - tokens0
    return rec
