"""T5 span corruption on numpy batches: noise and span counts, the raw length that fits an
inputs length (``random_spans_helper``), random-span noise masks from uniforms
(``random_spans_noise_mask``) and sentinel replacement (``noise_span_to_unique_sentinel``).
Shared by the native objectives (:mod:`repeat_scaling.data.objectives`) and the seqio tasks.
"""

from __future__ import annotations

import numpy as np

from repeat_scaling.data.features import ObjectiveError
from repeat_scaling.data.vocab import VocabInfo


def _round(x: float) -> int:
    """Round half to even, as Python's ``round`` and ``tf.round`` (T5 uses both)."""
    return int(round(x))


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float):
    """``(num_noise_tokens, num_noise_spans)`` for a sequence of ``length`` tokens.

    T5 ``random_spans_noise_mask``: length is raised to 2 to avoid degeneracy,
    ``num_noise`` clamped to ``[1, length-1]``, ``num_spans >= 1``.
    """
    length = max(length, 2)
    num_noise = min(max(_round(length * noise_density), 1), length - 1)
    num_spans = max(_round(num_noise / mean_noise_span_length), 1)
    return num_noise, num_spans


def span_corruption_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """``(raw_length, targets_length)`` for a target inputs length (T5 ``random_spans_helper``).

    Grows the raw length ``L`` while ``(L - noise) + spans + 1 <= inputs_length``; e.g.
    inputs 512 with density 0.15 and mean span 3 -> (568, 114).
    """
    _check_span_params(noise_density, mean_noise_span_length)
    if not isinstance(inputs_length, int | np.integer) or inputs_length < 2:
        raise ObjectiveError(f"inputs_length={inputs_length!r} must be an integer >= 2")

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise = int(round(tokens_length * noise_density))
        num_nonnoise = tokens_length - num_noise
        num_spans = int(round(num_noise / mean_noise_span_length))
        return num_nonnoise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs, targets = lengths(tokens_length)
    if noise_density == 0.5 and targets > inputs:
        tokens_length -= 1
        targets -= 1
    return tokens_length, targets


def _check_span_params(noise_density: float, mean_noise_span_length: float) -> None:
    if not (0.0 < float(noise_density) < 1.0):
        raise ObjectiveError(f"noise_density={noise_density!r} must be in (0, 1)")
    if not float(mean_noise_span_length) >= 1.0:
        raise ObjectiveError(f"mean_noise_span_length={mean_noise_span_length!r} must be >= 1")


def _segment_lengths(u: np.ndarray, num_items: int, num_segments: int) -> np.ndarray:
    """T5 ``_random_segmentation`` for a batch: uniforms ``[g, num_items-1]`` -> ``[g, k]``.

    Chooses the ``num_segments - 1`` segment starts uniformly among the ``num_items - 1``
    interior positions (the positions holding the smallest uniforms).
    """
    g = u.shape[0]
    if num_segments == 1:
        return np.full((g, 1), num_items, dtype=np.int64)
    k = num_segments - 1
    if k >= num_items - 1:
        # Every interior position starts a segment; T5 leaves the extra segments empty.
        ones = np.ones((g, num_items), np.int64)
        return np.concatenate([ones, np.zeros((g, num_segments - num_items), np.int64)], axis=1)
    else:
        idx = np.argpartition(u, k - 1, axis=1)[:, :k]
        idx.sort(axis=1)
    starts = np.concatenate([np.zeros((g, 1), np.int64), idx + 1], axis=1)
    ends = np.concatenate([starts[:, 1:], np.full((g, 1), num_items, np.int64)], axis=1)
    return ends - starts


def span_uniforms_needed(length: int, noise_density: float, mean_noise_span_length: float) -> int:
    """How many uniforms :func:`noise_mask_batch` consumes for one example."""
    n, s = noise_counts(length, noise_density, mean_noise_span_length)
    return (n - 1) + (max(length, 2) - n - 1)


def noise_mask_batch(
    u: np.ndarray, length: int, noise_density: float, mean_noise_span_length: float
) -> np.ndarray:
    """Boolean noise masks ``[g, length]`` (T5 ``random_spans_noise_mask``) from uniforms."""
    orig = length
    length = max(length, 2)
    n, s = noise_counts(length, noise_density, mean_noise_span_length)
    g = u.shape[0]
    noise_lens = _segment_lengths(u[:, : n - 1], n, s)
    nonnoise_lens = _segment_lengths(u[:, n - 1 :], length - n, s)
    lens = np.stack([nonnoise_lens, noise_lens], axis=2).reshape(g, 2 * s)
    parity = np.broadcast_to(np.tile(np.array([False, True]), s), (g, 2 * s))
    mask = np.repeat(parity.ravel(), lens.ravel()).reshape(g, length)
    return mask[:, :orig]


def span_corrupt_batch(
    tokens: np.ndarray, mask: np.ndarray, vocab: VocabInfo, mode_token: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Apply noise masks to ``tokens [g, L]`` -> ``(inputs [g, Li], targets [g, Lt])``.

    All rows must have the same number of noise tokens and spans (true for masks from
    :func:`noise_mask_batch`). Inputs: non-noise tokens with one sentinel per noise span,
    then EOS (after an optional leading mode token); targets: sentinel + span for each
    span, then EOS.
    """
    g, L = tokens.shape
    prev = np.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    noise_start = mask & ~prev
    nonnoise_start = ~mask & (prev | (np.arange(L) == 0))
    sentinel_base = vocab.vocab_size  # sentinel for span number c (1-based) = base - c
    in_vals = np.where(
        noise_start, sentinel_base - np.cumsum(noise_start, axis=1, dtype=np.int32), tokens
    )
    in_keep = ~mask | noise_start
    n_in = int(in_keep[0].sum())
    inputs = in_vals[in_keep].reshape(g, n_in)
    tg_vals = np.where(
        nonnoise_start, sentinel_base - np.cumsum(nonnoise_start, axis=1, dtype=np.int32), tokens
    )
    tg_keep = mask | nonnoise_start
    n_tg = int(tg_keep[0].sum())
    targets = tg_vals[tg_keep].reshape(g, n_tg)
    eos = np.full((g, 1), vocab.eos_id, dtype=tokens.dtype)
    parts = [inputs, eos]
    if mode_token is not None:
        parts.insert(0, np.full((g, 1), mode_token, dtype=tokens.dtype))
    return np.concatenate(parts, axis=1), np.concatenate([targets, eos], axis=1)
