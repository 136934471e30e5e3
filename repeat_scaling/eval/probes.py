"""Interpretability probes (Olsson et al. 2022 definitions; REFERENCE.md section 4).

Everything here is a pure numpy function over attention arrays or weight matrices, so the
probe math is tested on hand-made attention patterns and hand-built weights independently
of any model. Conventions:

- Attention arrays are ``[batch, heads, query, key]`` (rows sum to 1 over keys) for one
  layer, or a list/stacked array of those per layer. Scores come back as
  ``[layers, heads]`` float arrays (Python lists in results.jsonl).
- Probe sequences are ``[num_sequences, 1 + period * repeats]`` int32: BOS (the decoder
  start id 0, T5X convention) followed by ``period`` random tokens repeated ``repeats``
  times. They are fed as ``decoder_input_tokens``, so position ``i`` holds token ``i``.

Scores:

- prefix matching: for every query token in the 2nd..last repeat, the total attention to
  the positions that FOLLOWED its earlier occurrences (all of them: a perfect induction
  head may split its attention across earlier repeats and still scores 1), averaged over
  those queries and over sequences. Range [0, 1]; > ~0.4 is usually an induction head.
- previous token: mean attention from position ``i`` to ``i - 1`` over real (non-pad)
  query positions ``i >= 1``. Range [0, 1].
- copying: from a head's OV circuit (direct path embedding -> value -> output ->
  unembedding). For each source token t, the logit effect ``l = W_U(final_scale *
  W_O W_V norm(E[t]))`` is centred (mean over the vocabulary subtracted) and ReLU'd; the
  share ``relu(l)[t] / sum(relu(l))`` is averaged over tokens and rescaled from [0, 1] to
  [-1, 1] as ``2 * share - 1``. A perfect copying head scores 1; a head that raises other
  tokens, or nothing at all (share 0), scores -1; a random head scores about
  ``-1 + 4 / vocab``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOS_ID = 0  # decoder start id (T5X: decoder inputs are targets shifted right with 0).


class ProbeError(ValueError):
    """Probe inputs that cannot be used (one-line message)."""


# ----------------------------------------------------------------------------------------
# Token frequencies and synthetic probe sequences.
# ----------------------------------------------------------------------------------------


def token_counts(split, vocab_size: int, max_tokens: int = 4_000_000, block: int = 1 << 20):
    """Counts of every id among the first ``max_tokens`` tokens of a store split.

    ``split`` is any object with ``num_tokens`` and ``tokens(start, length)`` (a TokenStore
    split or an in-memory ArraySplit). Reads in blocks of ``block`` tokens (memory-mapped,
    O(block) memory). Returns int64 ``[vocab_size]``.
    """
    n = min(int(split.num_tokens), int(max_tokens))
    if n <= 0:
        raise ProbeError(f"cannot count token frequencies: split has {split.num_tokens} tokens")
    counts = np.zeros(vocab_size, np.int64)
    for start in range(0, n, block):
        ids = np.asarray(split.tokens(start, min(block, n - start))).astype(np.int64)
        if ids.size and int(ids.max()) >= vocab_size:
            raise ProbeError(f"token id {int(ids.max())} >= vocab_size {vocab_size} in the split")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def probe_candidates(
    counts: np.ndarray,
    exclude_ids: Sequence[int] = (0, 1, 2),
    exclude_fraction: float = 0.01,
    min_candidates: int = 25,
) -> np.ndarray:
    """Token ids eligible for random probe sequences, sorted.

    Keeps ids that occur in the training data (count > 0) and are not special
    (``exclude_ids``: pad/eos/unk, sentinels), then drops the most and the least common
    ``exclude_fraction`` of them (at least one id at each end), as Olsson et al. do.
    """
    counts = np.asarray(counts)
    if not 0.0 <= exclude_fraction < 0.5:
        raise ProbeError(f"exclude_fraction={exclude_fraction} must be in [0, 0.5)")
    ids = np.nonzero(counts > 0)[0]
    ids = ids[~np.isin(ids, np.asarray(list(exclude_ids), np.int64))]
    drop = max(1, int(round(exclude_fraction * ids.size)))
    if ids.size - 2 * drop < min_candidates:
        raise ProbeError(
            f"only {max(ids.size - 2 * drop, 0)} probe candidate tokens after excluding "
            f"special, most and least common ids; need >= {min_candidates}"
        )
    order = ids[np.argsort(counts[ids], kind="stable")]
    return np.sort(order[drop : ids.size - drop])


def repeated_random_sequences(
    candidates: np.ndarray,
    num_sequences: int = 10,
    period: int = 25,
    repeats: int = 4,
    seed: int = 0,
    bos_id: int = BOS_ID,
) -> np.ndarray:
    """``[num_sequences, 1 + period * repeats]`` int32: BOS then ``period`` distinct random
    candidate tokens repeated ``repeats`` times (deterministic in ``seed``)."""
    candidates = np.asarray(candidates)
    if num_sequences < 1 or period < 2 or repeats < 2:
        raise ProbeError(
            f"need num_sequences >= 1, period >= 2, repeats >= 2; got {num_sequences}, "
            f"{period}, {repeats}"
        )
    if candidates.size < period:
        raise ProbeError(f"{candidates.size} candidate tokens < period {period}")
    rng = np.random.default_rng([seed, 0x9E3779B9])
    rows = []
    for _ in range(num_sequences):
        seq = rng.choice(candidates, size=period, replace=False)
        rows.append(np.concatenate([[bos_id], np.tile(seq, repeats)]))
    return np.asarray(rows, np.int32)


# ----------------------------------------------------------------------------------------
# Attention-pattern scores.
# ----------------------------------------------------------------------------------------


def _stack_layers(attention) -> np.ndarray:
    """[layers, batch, heads, query, key] float64 from one layer or a list of layers."""
    if isinstance(attention, (list, tuple)):
        arr = np.stack([np.asarray(a, np.float64) for a in attention])
    else:
        arr = np.asarray(attention, np.float64)
        if arr.ndim == 4:
            arr = arr[None]
    if arr.ndim != 5:
        raise ProbeError(
            f"attention must be [batch, heads, query, key] per layer; got shape {arr.shape}"
        )
    return arr


def prefix_matching_mask(length: int, period: int, offset: int = 1) -> np.ndarray:
    """``[length, length]`` 0/1 mask of (query, key) pairs counted by prefix matching.

    For a sequence with ``offset`` leading tokens (BOS) then a period-``period`` repeat,
    query ``i`` (in the 2nd or later repeat) is paired with every key ``i - m*period + 1``
    (``m >= 1``): the token after each earlier occurrence of the query's token.
    """
    mask = np.zeros((length, length), np.float64)
    for i in range(offset + period, length):
        m = 1
        while i - m * period >= offset:
            mask[i, i - m * period + 1] = 1.0
            m += 1
    return mask


def prefix_matching_chance(period: int, repeats: int, offset: int = 1) -> float:
    """The prefix-matching score of a head attending uniformly to every causal key.

    What a head with no induction circuit scores on the probe layout: the mean over the
    scored queries of (number of paired keys) / (keys visible to the query).
    """
    length = offset + period * repeats
    mask = prefix_matching_mask(length, period, offset)
    queries = np.arange(offset + period, length)
    return float(np.mean(mask[queries].sum(axis=1) / (queries + 1)))


def copying_chance(vocab_size: int) -> float:
    """The copying score of a random OV circuit (about half the logits positive)."""
    return -1.0 + 4.0 / float(vocab_size)


def prefix_matching_scores(attention, period: int = 25, offset: int = 1) -> np.ndarray:
    """``[layers, heads]`` prefix-matching scores on repeated random sequences.

    ``attention``: per layer ``[batch, heads, L, L]`` computed on
    :func:`repeated_random_sequences` (``L = offset + period * repeats``).
    """
    att = _stack_layers(attention)
    length = att.shape[-1]
    if length < offset + 2 * period:
        raise ProbeError(f"sequence length {length} holds fewer than 2 repeats of {period}")
    mask = prefix_matching_mask(length, period, offset)
    per_query = np.einsum("lbhqk,qk->lbhq", att, mask)  # attention to "next of earlier"
    queries = np.arange(offset + period, length)
    return per_query[..., queries].mean(axis=(1, 3))


def previous_token_scores(attention, query_mask: np.ndarray | None = None) -> np.ndarray:
    """``[layers, heads]`` mean attention from position i to i-1 (i >= 1).

    ``query_mask``: optional ``[batch, L]`` 0/1, the real (non-padding) positions; a query
    counts when it and its predecessor are real.
    """
    att = _stack_layers(attention)
    _, b, _, length, _ = att.shape
    if length < 2:
        raise ProbeError(f"previous-token score needs length >= 2, got {length}")
    idx = np.arange(1, length)
    prev = att[..., idx, idx - 1]  # [layers, batch, heads, L-1]
    if query_mask is None:
        w = np.ones((b, length - 1))
    else:
        qm = np.asarray(query_mask, np.float64)
        w = qm[:, 1:] * qm[:, :-1]
    total = w.sum()
    if total <= 0:
        raise ProbeError("previous-token score: no real query positions")
    return np.einsum("lbhq,bq->lh", prev, w) / total


def cross_prefix_matching_scores(attention, source_length: int, offset: int = 1) -> np.ndarray:
    """``[layers, heads]`` the cross-attention analogue of prefix matching (encoder-decoder).

    The encoder reads a random sequence ``R`` (length ``source_length``); the decoder input
    is ``[BOS, R[:-1]]`` (``offset`` = 1 leading BOS), so decoder position ``i`` holds
    ``R[i-1]`` whose earlier occurrence is encoder position ``i-1``; the token that followed
    it is encoder position ``i``. Score = mean attention from decoder ``i`` to encoder ``i``
    over ``i`` in ``[offset, source_length)``.
    """
    att = _stack_layers(attention)
    lq, lk = att.shape[-2], att.shape[-1]
    idx = np.arange(offset, min(source_length, lq, lk))
    if idx.size == 0:
        raise ProbeError(f"cross prefix matching: no positions (source_length={source_length})")
    return att[..., idx, idx].mean(axis=(1, 3))


def head_max(scores) -> float | None:
    """Max over all layers and heads (None when there is no score)."""
    if scores is None:
        return None
    arr = np.asarray(scores, np.float64)
    return None if arr.size == 0 else float(arr.max())


# ----------------------------------------------------------------------------------------
# Copying score from the OV circuit.
# ----------------------------------------------------------------------------------------


def _rms_normalize(x: np.ndarray, scale: np.ndarray | None, eps: float = 1e-6) -> np.ndarray:
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if scale is None else y * scale


def copying_scores(
    embedding: np.ndarray,
    value: np.ndarray,
    output: np.ndarray,
    unembedding: np.ndarray,
    token_ids: np.ndarray,
    pre_scale: np.ndarray | None = None,
    final_scale: np.ndarray | None = None,
    vocab_size: int | None = None,
) -> np.ndarray:
    """``[heads]`` OV-circuit copying scores of one attention layer (see module docstring).

    Args:
      embedding: ``[V, d]`` input token embedding.
      value: ``[d, H, dk]`` value projection; output: ``[H, dk, d]`` output projection.
      unembedding: ``[d, V]`` output logits projection (the embedding transposed when tied).
      token_ids: source tokens to average over (e.g. the probe candidates).
      pre_scale: RMSNorm scale applied before the attention layer (``[d]``); None = no norm.
      final_scale: final RMSNorm scale applied before the logits (``[d]``).
      vocab_size: restrict the logit vector to the first ``vocab_size`` ids (drops the
        padding rows of a padded vocabulary).
    """
    emb = np.asarray(embedding, np.float64)
    wv = np.asarray(value, np.float64)
    wo = np.asarray(output, np.float64)
    wu = np.asarray(unembedding, np.float64)
    toks = np.asarray(token_ids, np.int64)
    if wv.ndim != 3 or wo.ndim != 3 or wv.shape[1:] != wo.shape[:2]:
        raise ProbeError(f"value {wv.shape} / output {wo.shape} are not [d,H,dk] / [H,dk,d]")
    v = vocab_size or wu.shape[1]
    x = emb[toks]
    x = _rms_normalize(x, None if pre_scale is None else np.asarray(pre_scale, np.float64))
    heads = np.einsum("td,dhk,hke->the", x, wv, wo)  # [T, H, d] per-head output
    if final_scale is not None:
        heads = heads * np.asarray(final_scale, np.float64)
    logits = np.einsum("the,ev->thv", heads, wu[:, :v])
    centred = logits - logits.mean(axis=-1, keepdims=True)
    pos = np.maximum(centred, 0.0)
    total = pos.sum(axis=-1)  # [T, H]
    own = pos[np.arange(toks.size), :, toks]  # [T, H]
    share = np.where(total > 0, own / np.where(total > 0, total, 1.0), 0.0)
    return 2.0 * share.mean(axis=0) - 1.0
