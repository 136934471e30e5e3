"""Parameter and dropout primitives shared by the model's layers (dense and MoE).

* :func:`param` creates every parameter, with its logical axis names (``out_sharding``
  metadata, see repeat_scaling/sharding.py); :func:`kernel_init` is T5X's kernel init.
* Dropout is explicit: functions take a PRNG key (or None) and a (possibly traced)
  ``dropout_scale`` that multiplies the configured rate; :class:`DropoutCtx` carries both
  through a call and derives one key per call site.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def kernel_init(
    in_axis: int | Sequence[int] = -2,
    out_axis: int | Sequence[int] = -1,
    scale: float = 1.0,
    distribution: str = "truncated_normal",
) -> Callable:
    """T5X default kernel init: variance_scaling(scale, fan_in) over the given axes."""
    return jax.nn.initializers.variance_scaling(
        scale, "fan_in", distribution, in_axis=in_axis, out_axis=out_axis
    )


def param(
    rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Sequence[str | None], dtype: Any
) -> nnx.Param:
    """An nnx.Param with logical axis names (no eager sharding: the trainer shards
    the state through jit out_shardings computed by sharding.state_shardings)."""
    if len(axes) != len(shape):
        raise ValueError(f"param shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    init = nnx.with_partitioning(init, tuple(axes), eager_sharding=False)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype))


# ----------------------------------------------------------------------------------------
# Dropout / DropPath
# ----------------------------------------------------------------------------------------
def _fold(key: Array | None, site: int) -> Array | None:
    return None if key is None else jax.random.fold_in(key, site)


def dropout(x: Array, rate: float, key: Array | None, scale: Any = 1.0) -> Array:
    """Inverted dropout with probability ``rate * scale``; identity when key is None."""
    if key is None or rate == 0.0:
        return x
    keep = 1.0 - rate * jnp.asarray(scale, jnp.float32)
    mask = jax.random.uniform(key, x.shape, jnp.float32) < keep
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


def droppath(x: Array, rate: float, key: Array | None, scale: Any = 1.0) -> Array:
    """Stochastic depth on a residual branch [B, ...]: drop whole examples' branch."""
    if key is None or rate == 0.0:
        return x
    keep = 1.0 - rate * jnp.asarray(scale, jnp.float32)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.uniform(key, shape, jnp.float32) < keep
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


@dataclasses.dataclass(frozen=True)
class DropoutCtx:
    """Per-call dropout settings: key None means deterministic."""

    key: Array | None = None
    scale: Any = 1.0

    def sub(self, site: int) -> DropoutCtx:
        return DropoutCtx(_fold(self.key, site), self.scale)
