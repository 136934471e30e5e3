"""The key/value cache of incremental decoding (:mod:`repeat_scaling.models.decoding`).

Layout, per layer: ``{"k", "v"}``: [batch, length, heads, head_dim] in the compute dtype,
the self-attention keys (after rotary embedding) and values of every position fed so far;
with cross-attention also ``{"ck", "cv"}``: [batch, encoded_length, heads, head_dim], the
encoder output's keys and values, computed once at the first step. A mixture-of-experts
unit (``layers.LayerGroup``) holds a tuple of its layers' caches. A stack's cache
(:func:`init`) holds one unit cache per repeated unit: stacked on a leading unit axis for
scanned and shared stacks, a list for unrolled ones.

Attention writes the new positions' keys and values with :func:`write`; the model's
``decode_step`` threads the cache through its decoder stack.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from repeat_scaling.models.config import ModelConfig

Array = jax.Array


def init(
    cfg: ModelConfig,
    *,
    mode: str,
    num_units: int,
    group: int,
    batch: int,
    length: int,
    cross_length: int | None = None,
) -> Any:
    """A zero cache for a stack of ``num_units`` units of ``group`` layers; ``mode`` is the
    stack's ("scan", "shared" or "list"); ``cross_length`` adds the cross-attention
    entries."""
    one = _unit(cfg, group, batch, length, cross_length)
    if mode == "list":
        return [one for _ in range(num_units)]
    return jax.tree.map(lambda z: jnp.zeros((num_units,) + z.shape, z.dtype), one)


def _unit(cfg: ModelConfig, group: int, batch: int, length: int, cross_length: int | None) -> Any:
    z = jnp.zeros((batch, length, cfg.num_heads, cfg.head_dim), cfg.compute_dtype)
    one = {"k": z, "v": z}
    if cross_length is not None:
        c = jnp.zeros((batch, cross_length, cfg.num_heads, cfg.head_dim), cfg.compute_dtype)
        one.update(ck=c, cv=c)
    return tuple(one for _ in range(group)) if cfg.is_moe else one  # MoE units: LayerGroup


def write(buf: Array, new: Array, index: Array) -> Array:
    """Write ``new`` [B, q, ...] into ``buf`` [B, T, ...] at row-wise offsets ``index`` [B]."""

    def one(b, n, i):
        return jax.lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), i, axis=0)

    return jax.vmap(one)(buf, new, index)
