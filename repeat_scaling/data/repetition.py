"""The repetition plan: which chunk of the token store fills every training slot.

Vocabulary of this module
-------------------------
- *chunk*: ``L`` consecutive tokens of the train split, chunk ``c`` = tokens
  ``[c*L, (c+1)*L)``, where ``L`` is the objective's raw length (store tokens per
  example). ``num_chunks`` (``C``) = ``train_tokens // L``.
- *slot*: one training example; slot ``i`` of ``num_slots`` (``N``). Step ``s`` of a run
  with global batch ``B`` consumes slots ``[s*B, (s+1)*B)``, so after ``s`` steps
  ``s*B`` slots are consumed.

Hernandez et al. (2022): a fraction ``f`` of the training tokens comes from a subset
that is repeated ``E`` times; the rest is unique (seen once). In slots:

    R = min(round_half_up(f * N / E), N // E)     repeated chunks (the subset)
    repeated slots = R * E                        each repeated chunk exactly E times
    U = N - R * E                                 unique chunks = unique slots (once each)

The fractional rule is therefore: the subset size is rounded to a whole number of chunks
(half up, never beyond ``N // E``), repetition counts stay exact integers, and the slots
left over are filled with unique data. The realised fraction ``R*E/N`` and the realised
epochs ``E`` are reported next to the requested ones in :meth:`RepetitionPlan.summary`.
``f > 0`` whose subset rounds to zero chunks is an error (never a silent ``f = 0``).
Xue et al. (2023) multi-epoch training (``U`` unique tokens for ``E`` epochs) is ``f = 1``
(:meth:`RepetitionPlan.from_unique_tokens`).

Layout
------
*Which* chunks: the plan uses ``R + U`` distinct chunks of the store, chosen by a seeded
bijection ``tau`` of ``[0, C)``: plan index ``j in [0, R)`` is repeated chunk
``tau(j)``, ``j in [R, R+U)`` unique chunk ``tau(j)``. The two pools are disjoint because
``tau`` is a bijection, and they are spread over the whole split rather than taken from
one region of it. The validation split is a different split and is never touched.

*When*: training is cut into ``E`` consecutive blocks, block ``k`` = slots
``[floor(k*N/E), floor((k+1)*N/E))`` (each at least ``N // E >= R`` slots). Inside block
``k`` a seeded Feistel permutation ``pi_k`` of the block places every repeated chunk
exactly once (positions ``q = pi_k(i - start) < R`` -> repeated chunk ``q``) and fills the
rest with the next unique chunks in order. So repetition ``k`` of every repeated chunk
happens in block ``k`` (``repetition`` is the true temporal occurrence index, 0-based),
repetitions are spread uniformly over training, and ``f = 1`` is exactly classic
multi-epoch training with a fresh shuffle per epoch. Every map is O(1) memory: a plan for
1e11 tokens costs nothing to build, and ``chunks(slots)`` costs O(len(slots)).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from repeat_scaling.data import feistel

# Key streams (derive_key(seed, stream, ...)).
_CHUNK_STREAM = 0
_BLOCK_STREAM = 1


class RepetitionPlanError(ValueError):
    """An impossible or ill-specified repetition plan (one-line message)."""


def fraction_in_range(repeated_fraction: float) -> bool:
    """The range rule of ``f``: a fraction in ``[0, 1]``."""
    return 0.0 <= repeated_fraction <= 1.0


def epochs_in_range(repeated_epochs: float) -> bool:
    """The range rule of ``E``: a whole number of epochs, at least 1."""
    return repeated_epochs >= 1 and float(repeated_epochs).is_integer()


def effective_epochs(repeated_fraction: Any, repeated_epochs: Any) -> Any:
    """The rule "E = 1 when f = 0": ``E`` as a plan reads it, 1 when nothing is repeated.

    A setting with ``effective_epochs(f, E) != E`` (``E > 1`` with ``f = 0``) is rejected
    by :class:`RepetitionPlan` and by the training config's validation.
    """
    return 1.0 if repeated_fraction == 0 else repeated_epochs


def distinct_share(
    repeated_fraction: float,
    repeated_epochs: float,
    unique_tokens: float | None = None,
    subset_tokens: float | None = None,
    total_tokens: float | None = None,
) -> float:
    """The share of the training tokens that are distinct (each chunk counted once).

    From a plan's exact accounting (:meth:`RepetitionPlan.summary`: ``unique_tokens``,
    ``subset_tokens``, ``total_tokens``, store tokens) when given: ``(unique + subset) /
    total``, at most 1; else from ``f`` and ``E``: ``(1 - f) + f / E`` (``E`` read as at
    least 1).
    """
    if unique_tokens is not None and subset_tokens is not None and total_tokens:
        return min((unique_tokens + subset_tokens) / total_tokens, 1.0)
    f, e = repeated_fraction, repeated_epochs
    return (1.0 - f) + f / max(e, 1.0)


def _as_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer | float):
        raise RepetitionPlanError(f"{name}={value!r} must be an integer >= {minimum}")
    if isinstance(value, float) and not value.is_integer():
        raise RepetitionPlanError(f"{name}={value!r} must be an integer >= {minimum}")
    value = int(value)
    if value < minimum:
        raise RepetitionPlanError(f"{name}={value} must be an integer >= {minimum}")
    return value


class RepetitionPlan:
    """Maps training slots to store chunks with exact, recorded repetition.

    Args:
      num_chunks: how many example-sized chunks the train split offers (``C``).
      num_slots: number of training examples (``N`` = steps * global batch).
      repeated_fraction: ``f`` in ``[0, 1]``, fraction of slots filled from the repeated
        subset.
      repeated_epochs: ``E >= 1`` (integer), times each repeated chunk is seen.
      seed: non-negative integer seeding both the chunk choice and the order.
      chunk_length: store tokens per chunk (only used to report tokens in ``summary``).

    Raises:
      RepetitionPlanError: ``f`` outside ``[0, 1]``, ``E < 1`` or not an integer,
        ``E > 1`` with ``f = 0``, a subset that rounds to zero chunks, or a corpus with
        fewer chunks than the plan needs (both numbers in the message).
    """

    def __init__(
        self,
        num_chunks: int,
        num_slots: int,
        repeated_fraction: float,
        repeated_epochs: int,
        seed: int,
        chunk_length: int = 1,
    ):
        self.num_chunks = _as_int("num_chunks", num_chunks, 1)
        self.num_slots = _as_int("num_slots", num_slots, 1)
        self.seed = _as_int("seed", seed, 0)
        self.chunk_length = _as_int("chunk_length", chunk_length, 1)
        try:
            f = float(repeated_fraction)
        except (TypeError, ValueError):
            raise RepetitionPlanError(
                f"repeated_fraction={repeated_fraction!r} must be a number in [0, 1]"
            ) from None
        if not fraction_in_range(f):
            raise RepetitionPlanError(f"repeated_fraction={repeated_fraction!r} must be in [0, 1]")
        self.requested_fraction = f
        try:
            e_float = float(repeated_epochs)
        except (TypeError, ValueError):
            raise RepetitionPlanError(
                f"repeated_epochs={repeated_epochs!r} must be an integer >= 1"
            ) from None
        if not epochs_in_range(e_float):
            raise RepetitionPlanError(
                f"repeated_epochs={repeated_epochs!r} must be >= 1"
                if not e_float >= 1
                else f"repeated_epochs={repeated_epochs!r} must be a whole number of epochs"
            )
        E = int(e_float)
        if effective_epochs(f, E) != E:
            raise RepetitionPlanError(
                f"repeated_epochs={E} with repeated_fraction=0: nothing to repeat; "
                "use repeated_epochs=1 for the unique baseline"
            )
        N = self.num_slots
        if E > N:
            raise RepetitionPlanError(
                f"repeated_epochs={E} exceeds num_slots={N}: a chunk cannot be seen more "
                "often than there are training examples"
            )
        self.epochs = E
        ideal = f * N / E
        R = min(math.floor(ideal + 0.5), N // E) if f > 0 else 0
        if f > 0 and R == 0:
            raise RepetitionPlanError(
                f"repeated_fraction={f} x num_slots={N} / repeated_epochs={E} = {ideal:.3g} "
                "repeated chunks rounds to 0; use more slots, a larger fraction or fewer epochs"
            )
        self.num_repeated = R
        self.num_unique = N - R * E
        needed = self.num_repeated + self.num_unique
        if needed > self.num_chunks:
            L = self.chunk_length
            raise RepetitionPlanError(
                f"corpus too small: the plan needs {needed} chunks ({needed * L} tokens: "
                f"{R} repeated + {self.num_unique} unique) but the train split offers "
                f"{self.num_chunks} chunks ({self.num_chunks * L} tokens); it never repeats "
                "silently"
            )
        self._chunk_key = feistel.derive_key(self.seed, _CHUNK_STREAM)
        self.requested_total_tokens = self.num_slots * self.chunk_length

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_tokens(
        cls,
        total_tokens: int,
        example_tokens: int,
        num_chunks: int,
        repeated_fraction: float,
        repeated_epochs: int,
        seed: int,
    ) -> RepetitionPlan:
        """Hernandez-style: ``T`` training tokens, ``num_slots = T // example_tokens``.

        ``example_tokens`` is the raw (store) length of one example; a remainder of ``T``
        smaller than one example is dropped (the realised ``T`` is in the summary).
        """
        total_tokens = _as_int("total_tokens", total_tokens, 1)
        example_tokens = _as_int("example_tokens", example_tokens, 1)
        if total_tokens < example_tokens:
            raise RepetitionPlanError(
                f"total_tokens={total_tokens} is less than one example ({example_tokens} tokens)"
            )
        plan = cls(
            num_chunks,
            total_tokens // example_tokens,
            repeated_fraction,
            repeated_epochs,
            seed,
            chunk_length=example_tokens,
        )
        plan.requested_total_tokens = total_tokens
        return plan

    @classmethod
    def from_unique_tokens(
        cls,
        unique_tokens: int,
        epochs: int,
        example_tokens: int,
        num_chunks: int,
        seed: int,
    ) -> RepetitionPlan:
        """Xue-style: ``U`` unique tokens trained for ``E`` epochs (``f = 1``, exact)."""
        unique_tokens = _as_int("unique_tokens", unique_tokens, 1)
        example_tokens = _as_int("example_tokens", example_tokens, 1)
        epochs = _as_int("epochs", epochs, 1)
        chunks = unique_tokens // example_tokens
        if chunks == 0:
            raise RepetitionPlanError(
                f"unique_tokens={unique_tokens} is less than one example ({example_tokens} tokens)"
            )
        return cls(num_chunks, chunks * epochs, 1.0, epochs, seed, chunk_length=example_tokens)

    # ------------------------------------------------------------------- the maps
    def _block_start(self, k: np.ndarray) -> np.ndarray:
        return (k * self.num_slots) // self.epochs

    def _plan_index(self, slots: np.ndarray):
        """slots -> (plan index j in [0, R+U), is_repeated, repetition)."""
        N, E, R = self.num_slots, self.epochs, self.num_repeated
        k = ((slots + 1) * E - 1) // N
        start = self._block_start(k)
        size = self._block_start(k + 1) - start
        q = feistel.permute(slots - start, size, feistel.derive_key(self.seed, _BLOCK_STREAM, k))
        is_rep = q < R
        unique_ordinal = (start - k * R) + (q - R)
        j = np.where(is_rep, q, R + unique_ordinal)
        repetition = np.where(is_rep, k, 0)
        return j, is_rep, repetition

    def _chunk_of(self, j: np.ndarray) -> np.ndarray:
        return feistel.permute(j, self.num_chunks, self._chunk_key)

    def chunks(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which chunk fills each slot.

        Args:
          slots: integer array of slot indices in ``[0, num_slots)``.

        Returns:
          ``(chunk, is_repeated, repetition)``, arrays shaped like ``slots``: the store
          chunk id (int64), whether it belongs to the repeated subset (bool), and for
          repeated chunks which occurrence this is in time (0..E-1; 0 for unique chunks).
        """
        slots = np.asarray(slots)
        if slots.dtype.kind not in "iu":
            raise RepetitionPlanError(f"slots must be integers, got dtype {slots.dtype}")
        slots = slots.astype(np.int64)
        if slots.size and (slots.min() < 0 or slots.max() >= self.num_slots):
            bad = slots[(slots < 0) | (slots >= self.num_slots)].ravel()[0]
            raise RepetitionPlanError(f"slot {int(bad)} outside the plan's [0, {self.num_slots})")
        j, is_rep, repetition = self._plan_index(slots)
        return self._chunk_of(j), is_rep, repetition.astype(np.int64)

    def repeated_chunks(self) -> np.ndarray:
        """Sorted store chunk ids of the repeated subset (``R`` of them)."""
        return np.sort(self._chunk_of(np.arange(self.num_repeated, dtype=np.int64)))

    def unique_chunks_all(self) -> np.ndarray:
        """Sorted store chunk ids of the whole unique pool (``U`` of them)."""
        R = self.num_repeated
        return np.sort(self._chunk_of(np.arange(R, R + self.num_unique, dtype=np.int64)))

    def unique_seen_chunks(self, num_slots_consumed: int) -> np.ndarray:
        """Sorted chunk ids of the unique chunks seen in the first ``num_slots_consumed`` slots.

        ``num_slots_consumed`` = steps done x global batch size (slots ``[0, n)``); cost is
        O(unique chunks returned + size of the one partially consumed block).
        """
        n = _as_int("num_slots_consumed", num_slots_consumed, 0)
        n = min(n, self.num_slots)
        R = self.num_repeated
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        k = ((n + 1) * self.epochs - 1) // self.num_slots  # block holding slot n (or E)
        k = min(k, self.epochs)
        start = int(self._block_start(k))
        done = start - k * R  # unique ordinals of the complete blocks
        js = [np.arange(R, R + done, dtype=np.int64)]
        if n > start:
            j, is_rep, _ = self._plan_index(np.arange(start, n, dtype=np.int64))
            js.append(j[~is_rep])
        return np.sort(self._chunk_of(np.concatenate(js)))

    # ----------------------------------------------------------------- accounting
    def repeated_per_step(self, start: int, stop: int, batch_size: int) -> np.ndarray:
        """Repeated slots in each step of ``[start, stop)``, step ``s`` = the global batch
        of slots ``[s*batch_size, (s+1)*batch_size)`` (int64 array of ``stop - start``).

        Computed in blocks of ~1M slots (memory stays bounded on resume).
        """
        B = batch_size
        block = max(1, 2**20 // B)
        counts = [np.zeros(0, np.int64)]
        for a in range(start, stop, block):
            b = min(a + block, stop)
            _, is_rep, _ = self.chunks(np.arange(a * B, b * B, dtype=np.int64))
            counts.append(np.count_nonzero(is_rep.reshape(b - a, B), axis=1))
        return np.concatenate(counts)

    def tokens_seen(self, num_slots: int, repeated_slots: int | None = None) -> dict[str, int]:
        """STORE tokens (``chunk_length`` per slot) of the unique and the repeated pool in
        ``num_slots`` slots: ``{"unique_tokens_seen", "repeated_tokens_seen"}``.

        ``repeated_slots``: how many of the slots hold a repeated chunk, when the caller
        has counted them (:meth:`repeated_per_step`); by default the slots are the first
        ``num_slots <= self.num_slots`` of the plan and the count comes from
        :meth:`unique_seen_chunks`.
        """
        if repeated_slots is None:
            repeated_slots = num_slots - int(self.unique_seen_chunks(num_slots).size)
        L = self.chunk_length
        return {
            "unique_tokens_seen": (num_slots - repeated_slots) * L,
            "repeated_tokens_seen": repeated_slots * L,
        }

    @property
    def realised_fraction(self) -> float:
        return self.num_repeated * self.epochs / self.num_slots

    def summary(self) -> dict[str, Any]:
        """The exact accounting (JSON-serialisable; written to the workdir as data_plan.json)."""
        R, U, E, L = self.num_repeated, self.num_unique, self.epochs, self.chunk_length
        return {
            "requested": {
                "repeated_fraction": self.requested_fraction,
                "repeated_epochs": self.epochs,
                "total_tokens": self.requested_total_tokens,
            },
            "realised": {
                "repeated_fraction": self.realised_fraction,
                "repeated_epochs": E,
                "total_tokens": self.num_slots * L,
            },
            "num_slots": self.num_slots,
            "num_chunks": self.num_chunks,
            "chunk_length": L,
            "seed": self.seed,
            "repeated_chunks": R,
            "unique_chunks": U,
            "repeated_slots": R * E,
            "unique_slots": U,
            "total_tokens": self.num_slots * L,
            "subset_tokens": R * L,
            "repeated_tokens": R * E * L,
            "unique_tokens": U * L,
            "store_tokens_available": self.num_chunks * L,
            "chunk_ranges": {
                "store_chunks": [0, self.num_chunks],
                "plan_index_repeated": [0, R],
                "plan_index_unique": [R, R + U],
                "chunk_of_plan_index": "feistel(seed, stream=0) over [0, num_chunks)",
                "chunk_c_tokens": "train split [c*chunk_length, (c+1)*chunk_length)",
            },
            "schedule": (
                "E blocks of slots [floor(k*N/E), floor((k+1)*N/E)); block k holds repetition k "
                "of every repeated chunk, placed by feistel(seed, stream=1, block=k)"
            ),
            "fractional_rule": "R = min(round_half_up(f*N/E), N//E); unique slots = N - R*E",
        }

    def write(self, path: str | os.PathLike) -> None:
        """Write :meth:`summary` as JSON (atomically)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.summary(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    def __repr__(self) -> str:
        return (
            f"RepetitionPlan(num_chunks={self.num_chunks}, num_slots={self.num_slots}, "
            f"f={self.requested_fraction}->{self.realised_fraction:.6g}, E={self.epochs}, "
            f"R={self.num_repeated}, U={self.num_unique}, seed={self.seed})"
        )
