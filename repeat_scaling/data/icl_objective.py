"""The ``icl`` objective: causal LM over the fixed-length sequences of an ICL store
(:mod:`repeat_scaling.data.icl_store`), the loss on the task's target positions.

The objective (:func:`make_icl_objective`, ``data.objective = "icl"``): causal LM over the
fixed-length sequence (decoder input = sequence shifted right, starting with 0) with loss
weight 1 on ``loss_positions`` only, or on every label position (``all_labels=True``).

Only numpy is needed here (no jax, no tensorflow).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from repeat_scaling.data.icl_tasks import IclTaskError
from repeat_scaling.data.vocab import EOS_ID


class IclObjective:
    """Causal LM over fixed-length ICL sequences, loss on the task's target positions.

    Same interface as :class:`repeat_scaling.data.objectives.Objective`: ``raw_length``
    (store tokens per example: the sequence and its EOS), ``feature_lengths``,
    ``tokens_per_example`` and ``__call__(chunks, slots, seed)``. Deterministic (the
    sequences carry their own randomness), so ``slots`` and ``seed`` are unused.
    """

    name = "icl"
    arch = "decoder_only"
    pack = False

    def __init__(self, task: dict[str, Any], all_labels: bool = False):
        self.task = task
        self.length = int(task["sequence_length"])
        self.raw_length = self.length + 1
        key = "label_positions" if all_labels else "loss_positions"
        if key not in task:
            raise IclTaskError(
                f"ICL task {task.get('name')!r} has no {key!r} (needed with "
                f"all_labels={bool(all_labels)}); expected it in the store's icl_task"
            )
        self.loss_positions = np.asarray(task[key], np.int64)
        self.all_labels = bool(all_labels)
        w = np.zeros(self.length, np.float32)
        w[self.loss_positions] = 1.0
        self._weights = w

    @property
    def feature_lengths(self) -> dict[str, int]:
        return {
            k: self.length
            for k in (
                "decoder_input_tokens",
                "decoder_target_tokens",
                "decoder_loss_weights",
                "decoder_segment_ids",
                "decoder_positions",
            )
        }

    @property
    def tokens_per_example(self) -> int:
        return self.length

    def features(self, sequences: np.ndarray) -> dict[str, np.ndarray]:
        """Model features of int sequences [B, L] (no EOS)."""
        seq = np.asarray(sequences, np.int32)
        b, n = seq.shape
        if n != self.length:
            raise IclTaskError(f"ICL sequences of length {n}; expected {self.length}")
        dec_in = np.zeros_like(seq)
        dec_in[:, 1:] = seq[:, :-1]
        return {
            "decoder_input_tokens": dec_in,
            "decoder_target_tokens": seq,
            "decoder_loss_weights": np.broadcast_to(self._weights, (b, n)).copy(),
            "decoder_segment_ids": np.ones((b, n), np.int32),
            "decoder_positions": np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)).copy(),
        }

    def __call__(self, chunks: np.ndarray, slots: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        chunks = np.asarray(chunks)
        if chunks.shape[1] != self.raw_length or np.any(chunks[:, -1] != EOS_ID):
            raise IclTaskError(
                f"ICL chunks must be sequences of {self.length} tokens + EOS "
                f"(raw_length {self.raw_length}); got shape {chunks.shape}"
            )
        return self.features(chunks[:, :-1])


def make_icl_objective(
    vocab: Any,
    arch: str,
    *,
    store_manifest: dict[str, Any] | None = None,
    length: int | None = None,
    pack: bool = False,
    all_labels: bool = False,
) -> IclObjective:
    """The ``icl`` objective of a store whose manifest has ``icl_task``.

    Args:
      vocab: the store's VocabInfo (unused beyond the manifest check).
      arch: must be "decoder_only".
      store_manifest: the store's manifest (the trainer passes ``store.manifest``).
      length: ``data.length``; must equal the task's ``sequence_length`` when given.
      pack: must be False (sequences are fixed-length already).
      all_labels: loss on every label position instead of the query's only.
    """
    del vocab
    if arch != "decoder_only":
        raise IclTaskError(f"objective 'icl' needs a decoder_only model, got arch={arch!r}")
    if store_manifest is None or "icl_task" not in store_manifest:
        raise IclTaskError(
            "objective 'icl' needs a store prepared from an icl_* source "
            "(its manifest has no 'icl_task')"
        )
    if pack:
        raise IclTaskError(
            "data.pack=True; expected False for objective 'icl' (fixed-length sequences)"
        )
    task = store_manifest["icl_task"]
    L = int(task["sequence_length"])
    if length not in (None, 0) and int(length) != L:
        raise IclTaskError(f"data.length={length}; expected the ICL task's sequence_length={L}")
    return IclObjective(task, all_labels=all_labels)
