"""Packing variable-length examples into fixed-length rows (segment ids and positions).

T5X conventions: ``segment_ids`` number the examples of a row ``1..k`` and are ``0`` on
padding; ``positions`` restart at 0 for every example. A model given these features
attends only within a segment, so packed examples never see each other.

The objectives pack the examples one chunk yields (one slot -> one row, see
:mod:`repeat_scaling.data.objectives`); :func:`pack_sequences` packs any stream of
variable-length sequences greedily in order (e.g. held-out documents) into rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PackingOverflow(ValueError):
    """The examples given do not fit into one row."""


def pack_into_row(
    pieces: Sequence[dict[str, np.ndarray]], length: int, dtypes: dict[str, type] | None = None
) -> dict[str, np.ndarray]:
    """Concatenate ``pieces`` (each a dict of equal-length 1-D features) into one row.

    Args:
      pieces: examples in order; every feature of one piece has the same length.
      length: row length.
      dtypes: optional output dtype per feature (default int32).

    Returns:
      dict with every feature padded with 0 to ``length``, plus ``segment_ids``
      (1..k, 0 = pad) and ``positions`` (0-based within each piece, 0 on padding).

    Raises:
      PackingOverflow: the pieces hold more than ``length`` positions.
    """
    total = 0
    for p in pieces:
        total += len(next(iter(p.values()))) if p else 0
    if total > length:
        raise PackingOverflow(f"{len(pieces)} examples hold {total} tokens > row length {length}")
    dtypes = dtypes or {}
    names = list(pieces[0]) if pieces else []
    out = {n: np.zeros(length, dtype=dtypes.get(n, np.int32)) for n in names}
    seg = np.zeros(length, dtype=np.int32)
    pos = np.zeros(length, dtype=np.int32)
    at = 0
    for i, p in enumerate(pieces):
        n = len(p[names[0]])
        for name in names:
            out[name][at : at + n] = p[name]
        seg[at : at + n] = i + 1
        pos[at : at + n] = np.arange(n, dtype=np.int32)
        at += n
    out["segment_ids"] = seg
    out["positions"] = pos
    return out


def pack_rows(rows: Sequence[Sequence[np.ndarray]], length: int) -> dict[str, np.ndarray]:
    """Vectorised packing: row ``r`` holds the 1-D examples ``rows[r]`` back to back.

    Args:
      rows: per row, its examples in order (each a 1-D integer array).
      length: row length.

    Returns:
      ``tokens``, ``segment_ids`` (1..k, 0 = pad), ``positions`` (int32 ``[rows, length]``)
      ``example_length`` (int32 ``[rows, length]``: the length of the example each
      position belongs to, 0 on padding) and ``example_index`` (int64 ``[rows, length]``:
      the index of that example in the flattened ``rows``, -1 on padding).

    Raises:
      PackingOverflow: naming the first row whose examples exceed ``length``.
    """
    n = len(rows)
    counts = np.array([len(r) for r in rows], dtype=np.int64)
    flat = [e for r in rows for e in r]
    lengths = np.array([len(e) for e in flat], dtype=np.int64)
    row_of = np.repeat(np.arange(n), counts)
    totals = np.bincount(row_of, weights=lengths, minlength=n).astype(np.int64)
    if n and totals.max(initial=0) > length:
        r = int(np.argmax(totals > length))
        raise PackingOverflow(f"row {r}: {counts[r]} examples hold {totals[r]} tokens > {length}")
    out = {
        k: np.zeros((n, length), np.int32)
        for k in ("tokens", "segment_ids", "positions", "example_length")
    }
    out["example_index"] = np.full((n, length), -1, np.int64)
    if not flat or lengths.sum() == 0:
        return out
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # index of each row's first example
    ends = np.cumsum(lengths)
    starts_global = ends - lengths  # start of each example in the flat concatenation
    row_start_global = np.repeat(starts_global[first[counts > 0]], counts[counts > 0])
    offset_in_row = starts_global - row_start_global
    seg = np.arange(len(flat)) - np.repeat(first, counts) + 1
    pos = np.arange(ends[-1]) - np.repeat(starts_global, lengths)
    dest = np.repeat(row_of * length + offset_in_row, lengths) + pos
    out["tokens"].ravel()[dest] = np.concatenate(flat)
    out["segment_ids"].ravel()[dest] = np.repeat(seg, lengths)
    out["positions"].ravel()[dest] = pos
    out["example_length"].ravel()[dest] = np.repeat(lengths, lengths)
    out["example_index"].ravel()[dest] = np.repeat(np.arange(len(flat)), lengths)
    return out


def pack_sequences(sequences: Sequence[np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Greedily pack sequences in order into ``[rows, length]`` arrays.

    A sequence longer than ``length`` is split into ``length``-sized pieces first. A new row
    starts when the next sequence does not fit in the current one.

    Returns:
      ``{"tokens", "segment_ids", "positions"}``, int32 ``[rows, length]``.
    """
    if length < 1:
        raise ValueError(f"row length {length} must be >= 1")
    rows: list[list[dict[str, np.ndarray]]] = [[]]
    used = 0
    for seq in sequences:
        seq = np.asarray(seq)
        for start in range(0, max(len(seq), 1), length):
            piece = seq[start : start + length]
            if not len(piece):
                continue
            if used + len(piece) > length:
                rows.append([])
                used = 0
            rows[-1].append({"tokens": piece})
            used += len(piece)
    packed = [pack_into_row(r, length) for r in rows if r]
    if not packed:
        z = np.zeros((0, length), dtype=np.int32)
        return {"tokens": z, "segment_ids": z.copy(), "positions": z.copy()}
    return {k: np.stack([p[k] for p in packed]) for k in packed[0]}


def packing_efficiency(segment_ids: np.ndarray) -> float:
    """Fraction of positions that hold real tokens (segment id != 0)."""
    segment_ids = np.asarray(segment_ids)
    if segment_ids.size == 0:
        return 0.0
    return float(np.count_nonzero(segment_ids) / segment_ids.size)


def split_documents(tokens: np.ndarray, eos_id: int, min_length: int = 2) -> list[np.ndarray]:
    """Split a chunk after every EOS into documents (each keeps its trailing EOS).

    The last piece may lack an EOS (the chunk cut the document). A piece with fewer than
    ``min_length`` non-EOS tokens is merged into the following piece (into the previous
    one when it is last), so every returned piece has at least ``min_length`` non-EOS
    tokens unless the whole chunk has fewer. Concatenating the pieces gives ``tokens``
    back.
    """
    tokens = np.asarray(tokens)
    ends = np.flatnonzero(tokens == eos_id) + 1
    bounds = [0, *[int(e) for e in ends if e < len(tokens)], len(tokens)]
    pieces: list[np.ndarray] = []
    carry_start = None
    for a, b in zip(bounds[:-1], bounds[1:]):
        start = a if carry_start is None else carry_start
        piece = tokens[start:b]
        content = int(np.count_nonzero(piece != eos_id))
        if content < min_length:
            carry_start = start
            continue
        carry_start = None
        pieces.append(piece)
    if carry_start is not None:
        rest = tokens[carry_start:]
        if pieces:
            pieces[-1] = np.concatenate([pieces[-1], rest])
        else:
            pieces.append(rest)
    return pieces
