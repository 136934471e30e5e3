"""Builders the trainer and the evaluator use: objective, plan, held-out and chunk batches.

Imports no jax and no tensorflow: everything here is numpy over a token-store split (or
an :class:`~repeat_scaling.data.batcher.ArraySplit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from repeat_scaling.data.batcher import ArraySplit, Batcher, BatcherError, read_chunks
from repeat_scaling.data.objectives import Objective, make_objective
from repeat_scaling.data.repetition import RepetitionPlan, RepetitionPlanError

__all__ = [
    "ArraySplit",
    "Batcher",
    "build_plan",
    "chunk_batches",
    "heldout_batches",
    "make_objective",
]


def build_plan(
    split: Any,
    objective: Objective,
    num_steps: int,
    global_batch_size: int,
    repeated_fraction: float,
    repeated_epochs: int,
    seed: int,
) -> RepetitionPlan:
    """The plan for ``num_steps`` steps of ``global_batch_size`` examples over ``split``.

    ``num_chunks = split.num_tokens // objective.raw_length``; a corpus too small raises
    :class:`RepetitionPlanError` naming the tokens needed and available.
    """
    L = objective.raw_length
    for name, v in (("num_steps", num_steps), ("global_batch_size", global_batch_size)):
        if not isinstance(v, int | np.integer) or v < 1:
            raise RepetitionPlanError(f"{name}={v!r} must be an integer >= 1")
    num_chunks = split.num_tokens // L
    if num_chunks < 1:
        raise RepetitionPlanError(
            f"corpus too small: the train split has {split.num_tokens} tokens, fewer than one "
            f"example ({L} tokens)"
        )
    return RepetitionPlan(
        num_chunks,
        int(num_steps) * int(global_batch_size),
        repeated_fraction,
        repeated_epochs,
        seed,
        chunk_length=L,
    )


def _pad_rows(features: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pad a feature dict with all-zero rows (zero loss weight, segment 0) up to ``rows``."""
    n = next(iter(features.values())).shape[0]
    if n == rows:
        return features
    return {
        k: np.concatenate([v, np.zeros((rows - n, *v.shape[1:]), v.dtype)])
        for k, v in features.items()
    }


def chunk_batches(
    split: Any,
    chunk_ids: Sequence[int] | np.ndarray,
    objective: Objective,
    batch_size: int,
    seed: int,
) -> list[dict[str, np.ndarray]]:
    """Feature batches for the given chunks of ``split`` (chunk c = tokens ``[c*L, (c+1)*L)``).

    For the evaluator: loss on the repeated subset (``plan.repeated_chunks()``) or on the
    unique data seen (``plan.unique_seen_chunks(n)``). The noise of chunk ``c`` is keyed by
    ``(seed, c)`` (deterministic). The last batch is padded to ``batch_size`` with all-zero
    rows whose loss weights are 0, so every batch has the same shape.
    """
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise BatcherError(f"batch_size={batch_size!r} must be an integer >= 1")
    ids = np.asarray(chunk_ids, dtype=np.int64).ravel()
    L = objective.raw_length
    available = split.num_tokens // L
    if ids.size and (ids.min() < 0 or ids.max() >= available):
        bad = int(ids[(ids < 0) | (ids >= available)][0])
        raise BatcherError(f"chunk id {bad} outside the split's [0, {available}) chunks of {L}")
    out = []
    for start in range(0, ids.size, batch_size):
        part = ids[start : start + batch_size]
        feats = objective(read_chunks(split, part, L), part, seed)
        out.append(_pad_rows(feats, batch_size))
    return out


def heldout_batches(
    split: Any, objective: Objective, batch_size: int, num_batches: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """``num_batches`` batches from consecutive chunks ``0, 1, ...`` of a (validation) split.

    Deterministic; raises when the split holds fewer than ``batch_size * num_batches``
    chunks (both numbers in the message).
    """
    for name, v in (("batch_size", batch_size), ("num_batches", num_batches)):
        if not isinstance(v, int | np.integer) or v < 1:
            raise BatcherError(f"{name}={v!r} must be an integer >= 1")
    L = objective.raw_length
    need = batch_size * num_batches
    available = split.num_tokens // L
    if need > available:
        raise BatcherError(
            f"held-out split too small: {num_batches} batches x {batch_size} examples x {L} "
            f"tokens = {need * L} tokens needed, the split has {split.num_tokens} "
            f"({available} chunks)"
        )
    return chunk_batches(split, np.arange(need), objective, batch_size, seed)
