"""Linear self-attention (LSA) transformers for in-context regression (von Oswald et al. 2022).

Tokens are the paper's ``e_i = (x_i, y_i)`` in ``R^(d+1)`` for the ``n`` context pairs and
``e_q = (x_q, 0)`` for the query (see repeat_scaling/data/icl_regression.py). One LSA layer
with ``H`` heads updates every token ``j`` as

    e_j <- e_j + sum_h P_h W_V,h (1/n sum_{i <= n} e_i (W_K,h e_i)^T) W_Q,h e_j

i.e. attention WITHOUT softmax, where the keys and values are the ``n`` context tokens only
(the query never attends to itself, and nothing attends to the query). The paper's sum has
no ``1/n``; averaging instead only rescales ``P`` and makes the weights independent of
``n``. A model stacks ``K`` such layers (separate weights) and predicts
``y_hat = -(e_q)_y``: the NEGATED y slot of the query after the last layer (the paper's
read-out).

The one-step gradient-descent construction (:func:`set_gd_weights`, the paper's
Proposition 1): ``W_K = W_Q = [[I_d, 0], [0, 0]]``, ``W_V = [[0, 0], [0, -1]]`` and ``P = eta I``
in head 0 (other heads zero). Then the query's y slot becomes
``-eta * 1/n sum_i y_i x_i . x_q``, the negated prediction of one GD step with learning rate
``eta`` from ``w = 0`` on ``L(w) = 1/(2n) sum_i (w . x_i - y_i)^2``; each context token's y slot
becomes its residual ``y_i - w_1 . x_i``, so ``K`` layers with these weights compute ``K`` GD
steps (the paper's multi-step construction).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repeat_scaling.models.primitives import param

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LSAConfig:
    """Shape of a linear self-attention model.

    Attributes:
      d: input dimension (tokens have ``d + 1`` features).
      num_layers: stacked LSA layers (``K``).
      num_heads: heads per layer.
      init_scale: weights start ``N(0, (init_scale / sqrt(d + 1))^2)`` (truncated).
    """

    d: int
    num_layers: int = 1
    num_heads: int = 1
    init_scale: float = 0.5

    def __post_init__(self):
        for name in ("d", "num_layers", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LSAConfig.{name}={v!r} must be a positive integer")
        if not self.init_scale > 0:
            raise ValueError(f"LSAConfig.init_scale={self.init_scale!r} must be > 0")

    @property
    def dim(self) -> int:
        return self.d + 1


class LSALayer(nnx.Module):
    """One linear self-attention layer with a residual connection (no softmax, no norm)."""

    def __init__(self, cfg: LSAConfig, *, rngs: nnx.Rngs):
        h, e = cfg.num_heads, cfg.dim
        init = jax.nn.initializers.truncated_normal(cfg.init_scale / np.sqrt(e))
        axes = ("heads", None, None)
        # [heads, out, in]: W e is einsum("hoi,...i->...ho").
        self.w_q = param(rngs, init, (h, e, e), axes, jnp.float32)
        self.w_k = param(rngs, init, (h, e, e), axes, jnp.float32)
        self.w_v = param(rngs, init, (h, e, e), axes, jnp.float32)
        self.p = param(rngs, init, (h, e, e), axes, jnp.float32)

    def __call__(self, e: Array, num_context: int) -> Array:
        """``e``: [batch, tokens, d + 1], the first ``num_context`` tokens are the context."""
        q = jnp.einsum("hoi,bti->bhto", self.w_q[...], e)
        ctx = e[:, :num_context]
        k = jnp.einsum("hoi,bsi->bhso", self.w_k[...], ctx)
        v = jnp.einsum("hoi,bsi->bhso", self.w_v[...], ctx)
        # Linear attention: (1/n) sum_s v_s (k_s . q_t), computed as V^T K first ([e, e]).
        kv = jnp.einsum("bhso,bhsi->bhoi", v, k) / num_context
        out = jnp.einsum("bhoi,bhti->bhto", kv, q)
        return e + jnp.einsum("hoi,bhti->bto", self.p[...], out)


class LinearTransformer(nnx.Module):
    """``K`` stacked LSA layers; :meth:`predict` reads ``-(e_q)_y`` after the last one."""

    def __init__(self, cfg: LSAConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layers = nnx.List([LSALayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, tokens: Array) -> Array:
        """[batch, n + 1, d + 1] tokens (query last) -> the transformed tokens."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.cfg.dim:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)}; expected [batch, n + 1, {self.cfg.dim}]"
            )
        num_context = tokens.shape[1] - 1
        e = tokens
        for layer in self.layers:
            e = layer(e, num_context)
        return e

    def predict(self, tokens: Array) -> Array:
        """[batch] the prediction ``y_hat = -(e_q)_y`` at the query."""
        return -self(tokens)[:, -1, -1]


def regression_loss(pred: Array, target: Array) -> Array:
    """The paper's loss: ``1/(2B) sum_b (y_hat_b - y_b)^2``."""
    return 0.5 * jnp.mean(jnp.square(pred - target))


def set_gd_weights(model: LinearTransformer, eta: float) -> LinearTransformer:
    """Overwrite ``model``'s weights (in place) with the GD construction of step size ``eta``.

    Every layer gets the same weights, so the model computes ``num_layers`` GD steps from
    ``w = 0``; heads other than head 0 are zeroed.
    """
    cfg = model.cfg
    d, e, h = cfg.d, cfg.dim, cfg.num_heads
    wkq = np.zeros((h, e, e), np.float32)
    wkq[0, :d, :d] = np.eye(d)
    wv = np.zeros((h, e, e), np.float32)
    wv[0, d, d] = -1.0
    p = np.zeros((h, e, e), np.float32)
    p[0] = eta * np.eye(e)
    for layer in model.layers:
        layer.w_q[...] = jnp.asarray(wkq)
        layer.w_k[...] = jnp.asarray(wkq)
        layer.w_v[...] = jnp.asarray(wv)
        layer.p[...] = jnp.asarray(p)
    return model


def gd_model(cfg: LSAConfig, eta: float) -> LinearTransformer:
    """A fresh model of shape ``cfg`` holding the GD construction (:func:`set_gd_weights`)."""
    return set_gd_weights(LinearTransformer(cfg, rngs=nnx.Rngs(0)), eta)


def query_sensitivity(model: LinearTransformer, tokens: Array) -> Array:
    """[batch, d] ``d y_hat / d x_q`` per sequence (the paper's model-sensitivity comparison)."""
    d = model.cfg.d

    def one(xq: Array, seq: Array) -> Array:
        seq = seq.at[-1, :d].set(xq)
        return model.predict(seq[None])[0]

    return jax.vmap(jax.grad(one))(tokens[:, -1, :d], tokens)
