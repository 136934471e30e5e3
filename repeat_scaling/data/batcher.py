"""The batcher: global batch of step ``s`` = slots ``[s*B, (s+1)*B)``, built on demand.

There is no iterator state: ``batch(step)`` is a pure function of (split, plan, objective,
seed, step), so resuming at step ``s`` yields exactly what an uninterrupted run would have
seen, on any number of hosts. Host ``p`` of ``P`` builds only rows
``[p*B/P, (p+1)*B/P)`` of each global batch; the training loop hands them to jax
(``jax.make_array_from_process_local_data``). This module imports no jax.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from repeat_scaling.data.repetition import RepetitionPlan


class BatcherError(ValueError):
    """A bad batcher configuration or request (one-line message)."""


class ArraySplit:
    """An in-memory split with the token-store split interface (``num_tokens``, ``tokens``)."""

    def __init__(self, tokens: np.ndarray, eos_id: int = 1):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise BatcherError(
                f"ArraySplit needs a 1-D integer array, got shape {tokens.shape} {tokens.dtype}"
            )
        self._tokens = tokens
        self.num_tokens = int(tokens.size)
        self.dtype = tokens.dtype
        ends = np.flatnonzero(tokens == eos_id) + 1
        self.document_offsets = np.concatenate([[0], ends[ends < tokens.size]]).astype(np.int64)
        self.num_documents = int(len(self.document_offsets)) if tokens.size else 0

    def tokens(self, start: int, length: int) -> np.ndarray:
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise BatcherError(
                f"tokens [{start}, {start + length}) outside the split's [0, {self.num_tokens})"
            )
        return self._tokens[start : start + length]


def read_chunks(split: Any, chunk_ids: np.ndarray, raw_length: int) -> np.ndarray:
    """Tokens of chunks ``chunk_ids`` (chunk c = ``[c*L, (c+1)*L)``) as int32 ``[n, L]``."""
    chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
    out = np.empty((len(chunk_ids), raw_length), dtype=np.int32)
    for i, c in enumerate(chunk_ids):
        out[i] = split.tokens(int(c) * raw_length, raw_length)
    return out


_DONE = object()


class Batcher:
    """Builds this host's rows of every global batch (see module docstring).

    Args:
      split: the train split (``num_tokens``, ``tokens(start, length)``).
      plan: the :class:`RepetitionPlan` (its chunks index ``split``).
      objective: an :class:`~repeat_scaling.data.objectives.Objective`.
      global_batch_size: rows per step over all hosts (``B``).
      seed: objective seed (noise of slot ``i`` is keyed by ``(seed, i)``).
      process_index, process_count: this host and the number of hosts (``B % P == 0``).
      prefetch: batches the background thread of :meth:`iter_from` keeps ready.
    """

    def __init__(
        self,
        split: Any,
        plan: RepetitionPlan,
        objective: Any,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
    ):
        if not isinstance(global_batch_size, int | np.integer) or global_batch_size < 1:
            raise BatcherError(f"global_batch_size={global_batch_size!r} must be an integer >= 1")
        if not isinstance(process_count, int | np.integer) or process_count < 1:
            raise BatcherError(f"process_count={process_count!r} must be an integer >= 1")
        if not 0 <= process_index < process_count:
            raise BatcherError(f"process_index={process_index!r} must be in [0, {process_count})")
        if global_batch_size % process_count:
            raise BatcherError(
                f"global_batch_size={global_batch_size} is not divisible by "
                f"process_count={process_count}"
            )
        if prefetch < 1:
            raise BatcherError(f"prefetch={prefetch!r} must be >= 1")
        needed = plan.num_chunks * objective.raw_length
        if needed > split.num_tokens:
            raise BatcherError(
                f"plan indexes {plan.num_chunks} chunks x {objective.raw_length} tokens = {needed} "
                f"tokens but the split has {split.num_tokens}"
            )
        self.split, self.plan, self.objective = split, plan, objective
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.global_batch_size // self.process_count
        self.prefetch = int(prefetch)
        self.num_steps = plan.num_slots // self.global_batch_size
        if self.num_steps < 1:
            raise BatcherError(
                f"plan has {plan.num_slots} slots, fewer than one global batch of "
                f"{self.global_batch_size}"
            )
        self._stops: list[threading.Event] = []

    def _check_step(self, step: int) -> int:
        if not isinstance(step, int | np.integer) or not 0 <= step < self.num_steps:
            raise BatcherError(f"step {step!r} outside [0, {self.num_steps})")
        return int(step)

    def local_slots(self, step: int) -> np.ndarray:
        """Slots of this host's rows at ``step``."""
        step = self._check_step(step)
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        return np.arange(start, start + self.local_batch_size, dtype=np.int64)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's rows of the global batch of ``step`` (numpy feature dict)."""
        slots = self.local_slots(step)
        chunk, _, _ = self.plan.chunks(slots)
        tokens = read_chunks(self.split, chunk, self.objective.raw_length)
        return self.objective(tokens, slots, self.seed)

    def batches(self, start: int, n: int) -> dict[str, np.ndarray]:
        """This host's rows of steps ``start .. start+n-1``, stacked: ``[n, rows, ...]``."""
        per_step = [self.batch(start + i) for i in range(n)]
        return {k: np.stack([b[k] for b in per_step]) for k in per_step[0]}

    def repeated_examples(self, start: int, stop: int) -> np.ndarray:
        """Examples from repeated chunks in the GLOBAL batch of each step in ``[start, stop)``
        (:meth:`RepetitionPlan.repeated_per_step`)."""
        if stop > start:
            self._check_step(start)
            self._check_step(stop - 1)
        return self.plan.repeated_per_step(start, stop, self.global_batch_size)

    def accounting(self, step: int) -> dict[str, int]:
        """Store tokens from repeated vs unique chunks in the GLOBAL batch of ``step``
        (:meth:`RepetitionPlan.tokens_seen`; the plan's ``chunk_length`` is the objective's
        ``raw_length``, as ``pipeline.build_plan`` makes it)."""
        step = self._check_step(step)
        B = self.global_batch_size
        rep = int(self.repeated_examples(step, step + 1)[0])
        seen = self.plan.tokens_seen(B, rep)
        return {
            "step": step,
            "repeated_examples": rep,
            "unique_examples": B - rep,
            "repeated_tokens": seen["repeated_tokens_seen"],
            "unique_tokens": seen["unique_tokens_seen"],
        }

    def iter_from(self, step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches ``step, step+1, ... num_steps-1``, built ahead by a background thread."""
        if step != self.num_steps:
            self._check_step(step)
        return self._prefetched(self.batch(s) for s in range(step, self.num_steps))

    def iter_spans(self, spans: Iterable[tuple[int, int]]) -> Iterator[dict[str, np.ndarray]]:
        """:meth:`batches` of each ``(start, n)`` of ``spans``, built ahead by a thread."""
        return self._prefetched(self.batches(start, n) for start, n in spans)

    def _prefetched(self, items: Iterator[Any]) -> Iterator[Any]:
        """Yield ``items``, computed up to ``prefetch`` ahead by a background thread."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        self._stops.append(stop)

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for item in items:
                    if not put(item):
                        return
                put(_DONE)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                put(e)

        thread = threading.Thread(target=work, name="batcher-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    if stop.is_set() and not thread.is_alive():
                        return  # close() was called
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)

    def close(self) -> None:
        """Stop every prefetch thread this batcher started."""
        for stop in self._stops:
            stop.set()
        self._stops.clear()
