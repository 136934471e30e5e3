"""Mixture-of-experts feed-forward layer (Switch top-1 / GShard top-2 token choice).

Tokens are routed within groups (one group = one sequence of the batch, so groups shard
with the batch). Each expert processes at most ``capacity`` tokens per group::

    capacity = ceil(capacity_factor * top_k * group_size / num_experts)

Tokens are admitted in choice-priority order (every token's first choice before any
second choice, then in sequence order); tokens over capacity are dropped for that expert
(their residual stream passes unchanged). Gates are the router probabilities (top-1) or
the top-k probabilities renormalised to sum to 1 (k > 1).

Auxiliary losses (per layer, float32 scalars, NOT yet multiplied by the coefficients):
* load balance (Switch Transformer eq. 4):
  ``E * sum_e f_e * P_e`` with f_e the fraction of tokens whose first choice is e and P_e
  the mean router probability of e (averaged over groups); 1.0 when perfectly balanced;
* router z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2.

Expert weights are [expert, embed, mlp] / [expert, mlp, embed], sharded on the "expert"
mesh axis; the dispatch einsum produces [expert, group, capacity, embed] so XLA inserts the
all-to-all between batch and expert sharding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from repeat_scaling.models.config import ModelConfig
from repeat_scaling.models.primitives import DropoutCtx, dropout, kernel_init, param
from repeat_scaling.sharding import with_logical_constraint

Array = jax.Array


def expert_capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens each expert accepts per group (>= 1)."""
    return max(1, math.ceil(capacity_factor * top_k * group_size / num_experts))


def route(logits: Array, top_k: int, capacity: int):
    """Token-choice routing.

    Args:
      logits: router logits [G, S, E] float32.
    Returns:
      dispatch [G, S, E, C] (0/1), combine [G, S, E, C] (gate weights), probs [G, S, E],
      first-choice mask [G, S, E].
    """
    g, s, e = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    gates, idx = jax.lax.top_k(probs, top_k)  # [G, S, k]
    if top_k > 1:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    choice = jax.nn.one_hot(idx, e, dtype=jnp.int32)  # [G, S, k, E]
    # Priority: choice-major, then sequence order.
    cm = jnp.swapaxes(choice, 1, 2).reshape(g, top_k * s, e)
    pos = (jnp.cumsum(cm, axis=1) - 1).reshape(g, top_k, s, e)
    pos = jnp.sum(jnp.swapaxes(pos, 1, 2) * choice, axis=-1)  # [G, S, k]
    keep = pos < capacity
    slot = jax.nn.one_hot(jnp.where(keep, pos, capacity), capacity, dtype=jnp.float32)
    dispatch_k = choice.astype(jnp.float32)[..., None] * slot[..., None, :]  # [G,S,k,E,C]
    dispatch = jnp.sum(dispatch_k, axis=2)
    combine = jnp.sum(dispatch_k * gates[..., None, None], axis=2)
    return dispatch, combine, probs, choice[:, :, 0, :].astype(jnp.float32)


def load_balance_loss(probs: Array, first_choice: Array) -> Array:
    """Switch load-balancing loss E * sum_e f_e P_e (mean over groups)."""
    e = probs.shape[-1]
    f = jnp.mean(first_choice, axis=1)  # [G, E]
    p = jnp.mean(probs, axis=1)
    return jnp.mean(e * jnp.sum(f * p, axis=-1))


def router_z_loss(logits: Array) -> Array:
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


class MoeMlp(nnx.Module):
    """Top-k mixture of gated-GeLU experts. Call: (x [B, L, d], drop) -> (y, aux [2])."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = cfg.storage_dtype
        e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
        self.num_experts, self.top_k = e, cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.dtype = cfg.compute_dtype
        self.rate = cfg.dropout_rate
        self.router = param(
            rngs, kernel_init(0, 1, distribution="normal"), (d, e), ("embed", None), pd
        )
        self.wi_0 = param(rngs, kernel_init(1, 2), (e, d, f), ("expert", "embed", "mlp"), pd)
        self.wi_1 = param(rngs, kernel_init(1, 2), (e, d, f), ("expert", "embed", "mlp"), pd)
        self.wo = param(rngs, kernel_init(1, 2), (e, f, d), ("expert", "mlp", "embed"), pd)

    def __call__(self, x: Array, drop: DropoutCtx):
        dt = self.dtype
        g, s, _ = x.shape
        cap = expert_capacity(s, self.num_experts, self.top_k, self.capacity_factor)
        logits = jnp.einsum(
            "gsd,de->gse", x.astype(jnp.float32), self.router[...].astype(jnp.float32)
        )
        dispatch, combine, probs, first = route(logits, self.top_k, cap)
        aux = jnp.stack([load_balance_loss(probs, first), router_z_loss(logits)])
        xin = jnp.einsum("gsec,gsd->egcd", dispatch.astype(dt), x)
        xin = with_logical_constraint(xin, ("act_expert", "act_group", "capacity", "act_embed"))
        h0 = jnp.einsum("egcd,edf->egcf", xin, self.wi_0[...].astype(dt))
        h1 = jnp.einsum("egcd,edf->egcf", xin, self.wi_1[...].astype(dt))
        h = jax.nn.gelu(h0, approximate=True) * h1
        h = dropout(h, self.rate, drop.key, drop.scale)
        out = jnp.einsum("egcf,efd->egcd", h, self.wo[...].astype(dt))
        out = with_logical_constraint(out, ("act_expert", "act_group", "capacity", "act_embed"))
        y = jnp.einsum("gsec,egcd->gsd", combine.astype(dt), out)
        return with_logical_constraint(y, ("batch", "length", "act_embed")), aux
