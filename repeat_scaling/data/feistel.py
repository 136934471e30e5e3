"""Seeded O(1)-memory bijections over ``[0, n)``: a Feistel network with cycle walking.

A balanced Feistel network over ``2 * half_bits`` bits is a bijection of
``[0, 4**half_bits)`` for any round function; restricting it to ``[0, n)`` by *cycle
walking* (re-applying the permutation while the value is ``>= n``) keeps it a bijection
of ``[0, n)``. The domain is the smallest ``4**half_bits >= n``, so on average fewer
than four walks are needed. Nothing proportional to ``n`` is ever stored: permuting
one index costs the same for ``n = 10`` and ``n = 10**11`` (Levanter's data loader uses
the same idea to make resuming at step ``s`` free).

Everything is vectorised over numpy arrays; all arithmetic is on ``uint64`` (wrapping
multiplication is part of the mixing function). Keys may differ per element, which lets
callers permute many independent blocks in one call.
"""

from __future__ import annotations

import numpy as np

NUM_ROUNDS = 6

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a fast, well-mixing bijection of uint64 (vectorised)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x = x ^ (x >> np.uint64(27))
        x = x * _M2
        x = x ^ (x >> np.uint64(31))
    return x


def derive_key(*parts: int | np.ndarray) -> np.ndarray:
    """Hash integers (or arrays of them, broadcast) into one uint64 key per element."""
    key = np.zeros((), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for p in parts:
            p = np.asarray(p)
            if np.any(p < 0):
                raise ValueError(f"key parts must be non-negative integers, got {p!r}")
            key = mix64(key * _GOLDEN + p.astype(np.uint64) + np.uint64(1))
    return key


def _half_bits(n: int) -> int:
    """Smallest h >= 1 with 4**h >= n."""
    h = 1
    while (1 << (2 * h)) < n:
        h += 1
    return h


def _feistel(x: np.ndarray, keys: np.ndarray, half_bits: np.ndarray) -> np.ndarray:
    """One pass of the balanced Feistel network over [0, 4**half_bits) (per element)."""
    shift = np.asarray(half_bits, dtype=np.uint64)
    mask = (np.uint64(1) << shift) - np.uint64(1)
    left = x >> shift
    right = x & mask
    with np.errstate(over="ignore"):
        for r in range(NUM_ROUNDS):
            f = mix64(right ^ (keys + np.uint64(r) * _GOLDEN)) & mask
            left, right = right, left ^ f
    return (left << shift) | right


def _feistel_inverse(x: np.ndarray, keys: np.ndarray, half_bits: np.ndarray) -> np.ndarray:
    shift = np.asarray(half_bits, dtype=np.uint64)
    mask = (np.uint64(1) << shift) - np.uint64(1)
    left = x >> shift
    right = x & mask
    with np.errstate(over="ignore"):
        for r in reversed(range(NUM_ROUNDS)):
            f = mix64(left ^ (keys + np.uint64(r) * _GOLDEN)) & mask
            left, right = right ^ f, left
    return (left << shift) | right


def _walk(fn, x, n, key):
    x = np.asarray(x)
    if x.size and (x.min() < 0 or np.any(x >= n)):
        bad = x[(x < 0) | (x >= n)].ravel()[0]
        raise ValueError(f"index {int(bad)} outside the permutation domain [0, {np.max(n)})")
    shape = x.shape
    out = x.astype(np.uint64).ravel()
    keys = np.broadcast_to(np.asarray(key, dtype=np.uint64), shape).ravel().copy()
    limit = np.broadcast_to(np.asarray(n, dtype=np.uint64), shape).ravel().copy()
    # Each element's Feistel width comes from its OWN domain size, so an element's image
    # never depends on which other elements (other blocks) share the call.
    sizes, which = np.unique(limit, return_inverse=True)
    half = np.array([_half_bits(int(m)) for m in sizes], dtype=np.uint64)[which]
    todo = np.arange(out.size)
    while todo.size:
        out[todo] = fn(out[todo], keys[todo], half[todo])
        todo = todo[out[todo] >= limit[todo]]
    return out.astype(np.int64).reshape(shape)


def permute(x: np.ndarray, n: int | np.ndarray, key: int | np.ndarray) -> np.ndarray:
    """Apply the seeded bijection of ``[0, n)`` keyed by ``key`` to every element of ``x``.

    Args:
      x: integer array of indices in ``[0, n)``.
      n: domain size (scalar, or an array broadcastable to ``x`` for per-element domains;
        each element's Feistel width comes from its own domain, so the result for one
        element never depends on the others in the call).
      key: uint64 key (scalar or per element; see :func:`derive_key`).

    Returns:
      int64 array of the same shape: ``pi_key(x)``.
    """
    return _walk(_feistel, x, n, key)


def invert(y: np.ndarray, n: int | np.ndarray, key: int | np.ndarray) -> np.ndarray:
    """Inverse of :func:`permute` with the same ``n`` and ``key``."""
    return _walk(_feistel_inverse, y, n, key)
