"""Transformer building blocks (T5 v1.1 family) as Flax NNX modules.

Conventions:
* Activations are [batch, length, embed]; attention tensors [batch, heads, q_len, k_len].
* Every parameter is created through :func:`repeat_scaling.models.primitives.param` and
  carries logical axis names (``out_sharding`` metadata, see repeat_scaling/sharding.py);
  parameters are stored in ``cfg.param_dtype`` and cast to the compute dtype ``cfg.dtype``
  at use.
* Masks are boolean (True = may attend), shaped [batch | 1, 1, q_len, k_len].
* Dropout is explicit (:mod:`repeat_scaling.models.primitives`): functions take a PRNG
  key (or None) and a (possibly traced) ``dropout_scale`` that multiplies the configured
  rate, so "staged dropout" (scale 0 then 1) needs no recompilation. No RNG state is
  stored in the modules.
* Layer stacks (:class:`LayerStack`) run scanned (``lax.scan`` over stacked weights,
  compile time flat in depth), unrolled, or with one shared set of weights (ParamShare),
  with optional rematerialisation (``jax.checkpoint`` policy from ``cfg.remat_policy``).
* The MLP and logits projections and the attention scores, context and bias add come
  from :mod:`repeat_scaling.models.ops` (``cfg.ops``: hand-written VJPs tuned for XLA:CPU
  or plain autodiff; same forward values); a comment at each call names its einsum.
* Incremental decoding: :class:`Attention` writes its keys/values into a cache laid out
  by :mod:`repeat_scaling.models.kv_cache`, which the layers and stacks thread through.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repeat_scaling.models import cpu_attention, interventions, kv_cache, ops
from repeat_scaling.models.config import ModelConfig
from repeat_scaling.models.moe import MoeMlp
from repeat_scaling.models.primitives import DropoutCtx, dropout, droppath, kernel_init, param
from repeat_scaling.sharding import with_logical_constraint

Array = jax.Array
NEG_INF = -1e10  # additive bias for masked attention logits (finite: no NaN rows)

# Distinct streams for dropout call sites inside a layer (folded into the layer key).
_SITE_ATTN_WEIGHTS, _SITE_ATTN_OUT, _SITE_CROSS_WEIGHTS, _SITE_CROSS_OUT = 1, 2, 3, 4
_SITE_MLP_HIDDEN, _SITE_MLP_OUT, _SITE_DROPPATH_ATTN, _SITE_DROPPATH_CROSS = 5, 6, 7, 8
_SITE_DROPPATH_MLP = 9


# ----------------------------------------------------------------------------------------
# Basic layers
# ----------------------------------------------------------------------------------------
class RMSNorm(nnx.Module):
    """T5 layer norm: x * rsqrt(mean(x^2) + eps) * scale, in float32; no bias, no mean."""

    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs, eps: float = 1e-6):
        self.eps = eps
        self.dtype = cfg.compute_dtype
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",), cfg.storage_dtype)

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table [vocab, embed], init N(0, 1) as in T5X."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dtype = cfg.compute_dtype
        self.embedding = param(
            rngs,
            jax.nn.initializers.normal(1.0),
            (cfg.vocab_size, cfg.d_model),
            ("vocab", "embed"),
            cfg.storage_dtype,
        )

    def __call__(self, ids: Array) -> Array:
        # Gathering rows from a vocab-sharded table is not partitioned well by XLA: gather
        # the table first (FSDP all-gathers every weight at use anyway).
        table = with_logical_constraint(self.embedding[...], (None, None))
        # mode="clip": a plain row gather; the default "fill" adds a NaN-select over the
        # [B, L, embed] output that XLA:CPU fuses into a much slower element-wise gather.
        x = jnp.take(table, ids, axis=0, mode="clip").astype(self.dtype)
        return with_logical_constraint(x, ("batch", "length", "act_embed"))


class LogitsDense(nnx.Module):
    """Untied output projection [embed, vocab]; logits returned in float32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dtype = jnp.float32 if cfg.float32_logits else cfg.compute_dtype
        self.ops = ops.of(cfg.ops)
        self.kernel = param(
            rngs,
            kernel_init(),
            (cfg.d_model, cfg.vocab_size),
            ("embed", "vocab"),
            cfg.storage_dtype,
        )

    def __call__(self, x: Array) -> Array:
        # einsum("bld,dv->blv") in float32
        logits = self.ops.project_logits(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return with_logical_constraint(logits, ("batch", "length", "act_vocab"))


class Mlp(nnx.Module):
    """T5 v1.1 gated-GeLU MLP: (gelu_tanh(x wi_0) * (x wi_1)) wo, no biases."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = cfg.storage_dtype
        d, f = cfg.d_model, cfg.d_ff
        self.dtype = cfg.compute_dtype
        self.rate = cfg.dropout_rate
        self.ops = ops.of(cfg.ops)
        self.wi_0 = param(rngs, kernel_init(), (d, f), ("embed", "mlp"), pd)
        self.wi_1 = param(rngs, kernel_init(), (d, f), ("embed", "mlp"), pd)
        self.wo = param(rngs, kernel_init(), (f, d), ("mlp", "embed"), pd)

    def __call__(self, x: Array, drop: DropoutCtx) -> Array:
        dt = self.dtype
        dense = self.ops.dense  # einsum("...d,df->...f")
        h0 = dense(x, self.wi_0[...].astype(dt))
        h1 = dense(x, self.wi_1[...].astype(dt))
        h = jax.nn.gelu(h0, approximate=True) * h1
        h = with_logical_constraint(h, ("batch", "length", "act_mlp"))
        h = dropout(h, self.rate, drop.key, drop.scale)
        return dense(h, self.wo[...].astype(dt))


# ----------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------
def relative_position_bucket(
    relative_position: np.ndarray,
    bidirectional: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> np.ndarray:
    """T5's bucketing of (key_pos - query_pos) (numpy, static shapes; Mesh-TF formula)."""
    ret = np.zeros_like(relative_position, dtype=np.int32)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(np.int32) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    nf = np.maximum(n, 1).astype(np.float32)
    val_if_large = max_exact + (
        np.log(nf / np.float32(max_exact))
        / np.float32(np.log(max_distance / max_exact))
        * np.float32(num_buckets - max_exact)
    ).astype(np.int32)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large).astype(np.int32)


class RelativePositionBias(nnx.Module):
    """One table rel_embedding [heads, buckets] per stack; returns [1, H, q, k] float32."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_buckets
        self.max_distance = cfg.relative_max_distance
        init = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
        self.rel_embedding = param(
            rngs,
            init,
            (cfg.num_heads, cfg.relative_buckets),
            ("heads", "relpos_buckets"),
            cfg.storage_dtype,
        )

    def __call__(self, q_len: int, k_len: int) -> Array:
        # The bias depends only on r = k - q, which takes P = q_len + k_len - 1 values:
        # look those up (a tiny gather) and lay them out as the Toeplitz matrix
        # M[q, k] = v[k - q + q_len - 1] by tiling v and re-reading it with row stride
        # P - 1. Unlike a [q, k] gather, the backward pass is then a slice/pad/sum
        # instead of a q*k-element scatter (slow on CPU).
        rel = np.arange(-(q_len - 1), k_len)  # [P]
        buckets = relative_position_bucket(
            rel, self.bidirectional, self.num_buckets, self.max_distance
        )
        table = self.rel_embedding[...].astype(jnp.float32)
        v = jnp.take(table, jnp.asarray(buckets), axis=1)  # [H, P]
        if q_len == 1:
            return v[None, :, None, :]
        p = q_len + k_len - 1
        z = jnp.tile(v, (1, q_len))[:, q_len - 1 : q_len - 1 + q_len * (p - 1)]
        return z.reshape(-1, q_len, p - 1)[:, :, :k_len][None]

    def rows(self, q_positions: Array, k_len: int) -> Array:
        """Bias rows for queries at absolute ``q_positions`` [B, q] (< k_len) over keys
        0..k_len-1: [B, H, q, k_len] float32 (incremental decoding)."""
        rel = np.arange(-(k_len - 1), k_len)  # k - q for q, k in [0, k_len)
        buckets = relative_position_bucket(
            rel, self.bidirectional, self.num_buckets, self.max_distance
        )
        v = jnp.take(self.rel_embedding[...].astype(jnp.float32), jnp.asarray(buckets), axis=1)
        idx = jnp.arange(k_len)[None, None, :] - q_positions[..., None] + (k_len - 1)
        return jnp.moveaxis(jnp.take(v, idx, axis=1), 0, 1)  # [H, B, q, k] -> [B, H, q, k]


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """(sin, cos) [B, L, D/2] float32 of the rotary angles at positions [B, L]."""
    freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(freq)
    return jnp.sin(ang), jnp.cos(ang)


def rotate(x: Array, sin: Array, cos: Array) -> Array:
    """Rotary embedding (rotate-half convention) of x [B, L, H, D] with tables [B, L, D/2]."""
    d = x.shape[-1]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------------------
# Masks (T5X semantics)
# ----------------------------------------------------------------------------------------
def attention_mask(q_valid: Array, k_valid: Array) -> Array:
    """[B, q], [B, k] bool -> [B, 1, q, k]."""
    return (q_valid[:, :, None] & k_valid[:, None, :])[:, None]


def segment_mask(q_seg: Array, k_seg: Array) -> Array:
    return (q_seg[:, :, None] == k_seg[:, None, :])[:, None]


def causal_mask(length: int) -> Array:
    return jnp.asarray(np.tril(np.ones((length, length), bool)))[None, None]


def decoder_mask(
    decoder_target_tokens: Array | None,
    length: int,
    batch: int,
    segment_ids: Array | None = None,
    causal_attention: Array | None = None,
) -> Array:
    """Causal (or prefix-LM) mask, padding from targets when given, segments when given."""
    mask = causal_mask(length)
    if causal_attention is not None:
        prefix = causal_attention > 0
        mask = mask | attention_mask(prefix, prefix)
    mask = jnp.broadcast_to(mask, (batch, 1, length, length))
    if decoder_target_tokens is not None:
        valid = decoder_target_tokens > 0
        mask = mask & attention_mask(valid, valid)
    if segment_ids is not None:
        mask = mask & segment_mask(segment_ids, segment_ids)
    return mask


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------
class Attention(nnx.Module):
    """Multi-head dot-product attention, T5 style.

    Logits are NOT scaled by 1/sqrt(head_dim): the scale is folded into the query
    initialisation (fan-in normal / sqrt(head_dim)), as in T5/T5X. Softmax in float32.
    Weights: query/key/value [embed, heads, kv], out [heads, kv, embed].
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = cfg.storage_dtype
        d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
        self.dtype = cfg.compute_dtype
        self.rate = cfg.attention_dropout_rate
        self.rope_theta = cfg.rope_theta if cfg.position == "rope" else None
        self.impl = cfg.attention_impl
        self.ops = ops.of(cfg.ops)
        q_init = kernel_init(0, (1, 2), scale=1.0 / k)  # variance / head_dim
        kv_init = kernel_init(0, (1, 2))
        self.query = param(rngs, q_init, (d, h, k), ("embed", "heads", "kv"), pd)
        self.key = param(rngs, kv_init, (d, h, k), ("embed", "heads", "kv"), pd)
        self.value = param(rngs, kv_init, (d, h, k), ("embed", "heads", "kv"), pd)
        self.out = param(rngs, kernel_init((0, 1), 2), (h, k, d), ("heads", "kv", "embed"), pd)

    def project_kv(self, x_kv: Array) -> tuple[Array, Array]:
        """Keys and values [B, k, H, kv] of ``x_kv`` (before any rotary embedding)."""
        dt = self.dtype
        k = self.ops.project_heads(x_kv, self.key[...].astype(dt))  # einsum("bld,dhk->blhk")
        v = self.ops.project_heads(x_kv, self.value[...].astype(dt))
        k = with_logical_constraint(k, ("batch", "length", "act_heads", "act_kv"))
        v = with_logical_constraint(v, ("batch", "length", "act_heads", "act_kv"))
        return k, v

    def __call__(
        self,
        x_q: Array,
        x_kv: Array,
        mask: Array | None,
        bias: Array | None,
        drop: DropoutCtx,
        *,
        q_positions: Array | None = None,
        k_positions: Array | None = None,
        return_attention: bool = False,
        cache: dict[str, Array] | None = None,
        cache_index: Array | None = None,
        clamp: Any = None,
        kv: tuple[Array, Array] | None = None,
    ):
        """Returns (out [B, q, embed], weights [B, H, q, k] or None, new cache or None).

        ``kv``: precomputed (keys, values) of ``x_kv`` (:meth:`project_kv`; decoding reuses
        the cross-attention keys/values of the encoder output); ``x_kv`` is then unused.

        ``cache`` ({"k", "v"}: [B, T, H, kv]) switches to incremental decoding: the keys and
        values of the ``q`` new positions are written at ``cache_index[b] + 0..q-1`` (after
        rotary embedding) and the queries attend over the whole cache; ``mask`` / ``bias``
        are then [B | 1, 1 | H, q, T]. ``clamp`` = (StackClamps, per-head codes [H],
        residual stream [B, q, embed]) applies attention interventions
        (:mod:`repeat_scaling.models.interventions`); it forces the einsum path.
        """
        dt = self.dtype
        q = self.ops.project_heads(x_q, self.query[...].astype(dt))  # einsum("bld,dhk->blhk")
        q = with_logical_constraint(q, ("batch", "length", "act_heads", "act_kv"))
        k, v = self.project_kv(x_kv) if kv is None else kv
        impl = self.impl
        if cache is not None and impl in ("cudnn", "cpu_fused"):
            impl = "xla"  # incremental steps (1 query, cache-length mask): generic kernel
        fused = impl == "cpu_fused" and bias is None and not return_attention and clamp is None
        rope = None
        if self.rope_theta is not None and q_positions is not None:
            D = q.shape[-1]
            rope = (
                rope_tables(q_positions, D, self.rope_theta),
                rope_tables(k_positions, D, self.rope_theta),
            )
            if not fused:  # else the kernel rotates q and k as it loads them
                q, k = rotate(q, *rope[0]), rotate(k, *rope[1])
        new_cache = None
        if cache is not None:
            k, v = (kv_cache.write(cache[n], t, cache_index) for n, t in (("k", k), ("v", v)))
            new_cache = {"k": k, "v": v}
        weights = copied = None
        if fused:
            ctx = cpu_attention.fused_attention(q, k, v, mask, rope)
        elif impl != "einsum" and not return_attention and clamp is None:
            # Fused kernel: scale=1 (T5 folds 1/sqrt(d) into the query init).
            ctx = jax.nn.dot_product_attention(
                q,
                k,
                v,
                bias=None if bias is None else bias.astype(dt),
                mask=mask,
                scale=1.0,
                implementation=impl,
            )
        else:
            ctx, weights, copied = self._attend(q, k, v, mask, bias, drop, clamp)
        out = self.ops.merge_heads(ctx, self.out[...].astype(dt))  # einsum("bqhd,hdm->bqm")
        if copied is not None:
            out = out + copied.astype(out.dtype)
        out = with_logical_constraint(out, ("batch", "length", "act_embed"))
        return out, (weights if return_attention else None), new_cache

    def _attend(self, q, k, v, mask, bias, drop: DropoutCtx, clamp):
        """The einsum path: (context [B, q, H, kv], weights [B, H, q, k], the intervention's
        copied residual or None)."""
        logits = self.ops.attention_scores(q, k)  # einsum("bqhd,bkhd->bhqk") in float32
        if bias is not None:
            logits = self.ops.add_bias(logits, bias)  # logits + bias
        if mask is not None:
            logits = jnp.where(mask, logits, NEG_INF)
        weights = jax.nn.softmax(logits, axis=-1)
        if clamp is not None:
            weights = interventions.clamp_weights(weights, clamp)
        probs = dropout(weights, self.rate, drop.key, drop.scale).astype(self.dtype)
        ctx = self.ops.attention_context(probs, v)  # einsum("bhqk,bkhd->bqhd")
        copied = None
        if clamp is not None:
            ctx, copied = interventions.clamp_context(ctx, weights, clamp)
        return ctx, weights, copied


# ----------------------------------------------------------------------------------------
# Transformer layer and stacks
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class LayerInputs:
    """Everything a layer needs besides its residual stream (shared by all layers)."""

    mask: Array | None = None
    bias: Array | None = None
    positions: Array | None = None
    encoded: Array | None = None
    cross_mask: Array | None = None
    return_attention: bool = False
    # Incremental decoding: row offsets [B] at which this call's positions are cached.
    cache_index: Array | None = None
    # Decoding with cross-attention: compute the encoder keys/values into the cache (first
    # step) instead of reading them from it.
    fill_cross: bool = False
    # Attention interventions of this stack (interventions.StackClamps) or None.
    clamps: Any = None


class TransformerLayer(nnx.Module):
    """Pre-norm T5 v1.1 layer: self-attention, optional cross-attention, optional MLP/MoE.

    Returns (x, aux [2] = (load-balance loss, router z-loss) or zeros, attention tuple).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, cross_attention: bool, moe: bool):
        self.cfg = cfg
        self.has_cross = cross_attention
        self.has_mlp = not cfg.attention_only
        self.is_moe = moe
        self.pre_self_attention_layer_norm = RMSNorm(cfg.d_model, cfg, rngs)
        self.self_attention = Attention(cfg, rngs)
        if cross_attention:
            self.pre_cross_attention_layer_norm = RMSNorm(cfg.d_model, cfg, rngs)
            self.encoder_decoder_attention = Attention(cfg.replace(position="relative"), rngs)
        if self.has_mlp:
            self.pre_mlp_layer_norm = RMSNorm(cfg.d_model, cfg, rngs)
            if moe:
                self.mlp = MoeMlp(cfg, rngs)
            else:
                self.mlp = Mlp(cfg, rngs)

    def __call__(
        self,
        x: Array,
        inp: LayerInputs,
        drop: DropoutCtx,
        layer: Any = 0,
        cache: dict[str, Array] | None = None,
    ):
        """``layer``: this layer's index in its stack (int or traced; selects the clamps);
        ``cache``: this layer's self-attention K/V cache (decoding) or None.
        Returns (x, aux, attention tuple, new cache or None)."""
        cfg = self.cfg
        attn = []
        aux = jnp.zeros((2,), jnp.float32)
        clamp = None
        if inp.clamps is not None:
            clamp = (inp.clamps, inp.clamps.codes[layer], x)
        y = self.pre_self_attention_layer_norm(x)
        y, w, self_kv = self.self_attention(
            y,
            y,
            inp.mask,
            inp.bias,
            drop.sub(_SITE_ATTN_WEIGHTS),
            q_positions=inp.positions,
            k_positions=inp.positions,
            return_attention=inp.return_attention,
            cache=cache,
            cache_index=inp.cache_index,
            clamp=clamp,
        )
        if cache is not None:
            cache = dict(cache, **self_kv)  # keeps the cross-attention "ck" / "cv"
        attn.append(w)
        y = dropout(y, cfg.dropout_rate, drop.sub(_SITE_ATTN_OUT).key, drop.scale)
        x = x + droppath(y, cfg.droppath_rate, drop.sub(_SITE_DROPPATH_ATTN).key, drop.scale)
        if self.has_cross:
            y = self.pre_cross_attention_layer_norm(x)
            kv = None
            if cache is not None:  # decoding: encoder keys/values are computed once
                if inp.fill_cross:
                    ck, cv = self.encoder_decoder_attention.project_kv(inp.encoded)
                    cache = dict(
                        cache, ck=ck.astype(cache["ck"].dtype), cv=cv.astype(cache["cv"].dtype)
                    )
                kv = (cache["ck"], cache["cv"])
            y, w, _ = self.encoder_decoder_attention(
                y,
                inp.encoded,
                inp.cross_mask,
                None,
                drop.sub(_SITE_CROSS_WEIGHTS),
                return_attention=inp.return_attention,
                kv=kv,
            )
            attn.append(w)
            y = dropout(y, cfg.dropout_rate, drop.sub(_SITE_CROSS_OUT).key, drop.scale)
            x = x + droppath(y, cfg.droppath_rate, drop.sub(_SITE_DROPPATH_CROSS).key, drop.scale)
        if self.has_mlp:
            y = self.pre_mlp_layer_norm(x)
            if self.is_moe:
                y, aux = self.mlp(y, drop.sub(_SITE_MLP_HIDDEN))
            else:
                y = self.mlp(y, drop.sub(_SITE_MLP_HIDDEN))
            y = dropout(y, cfg.dropout_rate, drop.sub(_SITE_MLP_OUT).key, drop.scale)
            x = x + droppath(y, cfg.droppath_rate, drop.sub(_SITE_DROPPATH_MLP).key, drop.scale)
        x = with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, aux, tuple(attn) if inp.return_attention else (), cache


class LayerGroup(nnx.Module):
    """``moe_every`` consecutive layers, the last one MoE: the repeated unit of an MoE stack."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, cross_attention: bool):
        g = cfg.moe_every
        self.layers = nnx.List(
            [
                TransformerLayer(cfg, rngs, cross_attention=cross_attention, moe=(j == g - 1))
                for j in range(g)
            ]
        )

    def __call__(self, x: Array, inp: LayerInputs, drop: DropoutCtx, layer: Any = 0, cache=None):
        aux = jnp.zeros((2,), jnp.float32)
        attn: tuple = ()
        caches = []
        for j, sub in enumerate(self.layers):
            x, a, w, c = sub(
                x, inp, drop.sub(100 + j), layer + j, None if cache is None else cache[j]
            )
            aux = aux + a
            attn = attn + (w,)
            caches.append(c)
        return x, aux, attn, None if cache is None else tuple(caches)


def _remat_policy(name: str):
    """Rematerialisation policy: "full" saves nothing (recompute the layer in the backward
    pass), "dots" saves every matmul output, "dots_no_batch" saves the weight matmuls
    (not the attention score/value einsums, which carry batch dims)."""
    return {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[name]


class LayerStack(nnx.Module):
    """``n`` transformer layers: scanned, unrolled, or one shared unit (ParamShare).

    The repeated unit is one layer (dense) or a :class:`LayerGroup` of ``moe_every``
    layers (MoE). Scanned weights have a leading "layers" axis.
    """

    def __init__(self, cfg: ModelConfig, n: int, rngs: nnx.Rngs, *, cross_attention: bool):
        self.cfg = cfg
        g = cfg.moe_every if cfg.is_moe else 1
        if n % g:
            raise ValueError(f"layer count {n} is not a multiple of moe_every={g}")
        self.num_units = n // g
        self.group = g

        def make(r: nnx.Rngs) -> nnx.Module:
            if cfg.is_moe:
                return LayerGroup(cfg, r, cross_attention=cross_attention)
            return TransformerLayer(cfg, r, cross_attention=cross_attention, moe=False)

        self.mode = "shared" if cfg.param_share else ("scan" if cfg.scan_layers else "list")
        if self.mode == "shared":
            self.layers = make(rngs)
        elif self.mode == "scan":

            @nnx.split_rngs(splits=self.num_units)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stacked(r):
                return make(r)

            self.layers = make_stacked(rngs)
        else:
            self.layers = nnx.List([make(rngs) for _ in range(self.num_units)])

    def __call__(self, x: Array, inp: LayerInputs, drop: DropoutCtx, cache: Any = None):
        """Returns (x, aux [2] summed over layers, list of per-layer attention tuples), and
        the updated cache as a 4th element when a ``cache`` (from :meth:`init_cache`) is
        given (incremental decoding, ``inp.cache_index`` set)."""
        cfg = self.cfg
        g = self.group

        def body(x, state, graphdef, idx, c):
            unit = nnx.merge(graphdef, state)
            d = DropoutCtx(
                None if drop.key is None else jax.random.fold_in(drop.key, idx), drop.scale
            )
            return unit(x, inp, d, idx * g, c)

        if cfg.remat_policy != "none":
            body = jax.checkpoint(
                body,
                policy=_remat_policy(cfg.remat_policy),
                static_argnums=(2,),
                prevent_cse=self.mode == "list",
            )

        aux = jnp.zeros((2,), jnp.float32)
        per_unit: list[tuple] = []
        new_cache: Any = None
        if self.mode == "list":
            new_cache = []
            for i, unit in enumerate(self.layers):
                graphdef, state = nnx.split(unit)
                x, a, w, c = body(x, state, graphdef, i, None if cache is None else cache[i])
                aux, per_unit = aux + a, per_unit + [w]
                new_cache.append(c)
        else:
            graphdef, state = nnx.split(self.layers)
            shared = self.mode == "shared"

            def step(carry, xs):
                st, idx, c = xs
                y, a, w, c = body(carry, state if shared else st, graphdef, idx, c)
                return y, (a, w, c)

            idxs = jnp.arange(self.num_units)
            x, (a, w, new_cache) = jax.lax.scan(
                step,
                x,
                (None if shared else state, idxs, cache),
                unroll=min(cfg.scan_unroll, self.num_units),
            )
            aux = aux + a.sum(axis=0)
            per_unit = [jax.tree.map(lambda t, i=i: t[i], w) for i in range(self.num_units)]
        layers_attn: list[tuple] = []
        if inp.return_attention:
            for w in per_unit:
                layers_attn.extend(w if self.cfg.is_moe else [w])  # MoE unit: a group
        if cache is None:
            return x, aux, layers_attn
        return x, aux, layers_attn, new_cache

    def init_cache(self, batch: int, length: int, cross_length: int | None = None) -> Any:
        """This stack's zero key/value cache for incremental decoding (layout:
        :mod:`repeat_scaling.models.kv_cache`); ``cross_length`` adds the cross-attention
        keys/values."""
        return kv_cache.init(
            self.cfg,
            mode=self.mode,
            num_units=self.num_units,
            group=self.group,
            batch=batch,
            length=length,
            cross_length=cross_length,
        )
