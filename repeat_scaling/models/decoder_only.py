"""Decoder-only transformer (T5X `decoder_only` semantics) in Flax NNX.

Same block family as T5 v1.1 (pre-RMSNorm, gated-GeLU MLP, no biases, untied float32
output projection). Position scheme from ``cfg.position``: "rope" (default for the named
decoder-only sizes; rotary embeddings at ``decoder_positions`` or 0..L-1) or "relative"
(T5 causal relative position bias, one table). Attention is causal, or prefix-LM when
``decoder_causal_attention`` marks the bidirectional prefix (T5X semantics); padding from
``decoder_target_tokens`` when given; segment ids restrict attention to a packed segment.
``attention_only=True`` drops the MLP sublayers (interpretability models).

Parameter tree::

    token_embedder/embedding, decoder/relpos_bias/rel_embedding (relative only),
    decoder/layers/..., decoder/decoder_norm/scale, decoder/logits_dense/kernel
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from repeat_scaling.models import interventions as I
from repeat_scaling.models import layers as L
from repeat_scaling.models.config import ModelConfig

Array = jax.Array

_SITE_EMB, _SITE_FINAL, _SITE_STACK = 1, 2, 3


class DecoderStack(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        if cfg.position == "relative":
            self.relpos_bias = L.RelativePositionBias(cfg, bidirectional=False, rngs=rngs)
        self.layers = L.LayerStack(cfg, cfg.num_decoder_layers, rngs, cross_attention=False)
        self.decoder_norm = L.RMSNorm(cfg.d_model, cfg, rngs)
        self.logits_dense = L.LogitsDense(cfg, rngs)

    def __call__(
        self,
        x: Array,
        mask: Array,
        positions: Array | None,
        drop: L.DropoutCtx,
        return_attention: bool,
        clamps=None,
    ):
        cfg = self.cfg
        x = L.dropout(x, cfg.dropout_rate, drop.sub(_SITE_EMB).key, drop.scale)
        bias = self.relpos_bias(x.shape[1], x.shape[1]) if cfg.position == "relative" else None
        inp = L.LayerInputs(
            mask=mask,
            bias=bias,
            positions=positions,
            return_attention=return_attention,
            clamps=clamps,
        )
        x, aux, attn = self.layers(x, inp, drop.sub(_SITE_STACK))
        x = self.decoder_norm(x)
        x = L.dropout(x, cfg.dropout_rate, drop.sub(_SITE_FINAL).key, drop.scale)
        return self.logits_dense(x), aux, attn

    def decode(self, x: Array, mask: Array, positions: Array, cache, cache_index: Array):
        """Incremental step: x [B, q, embed] at absolute ``positions`` [B, q] (cache rows
        ``cache_index + 0..q-1``), mask [B, 1, q, T]. Returns (logits, aux, new cache)."""
        cfg = self.cfg
        bias = None
        if cfg.position == "relative":
            bias = self.relpos_bias.rows(positions, mask.shape[-1])
        inp = L.LayerInputs(
            mask=mask,
            bias=bias,
            positions=positions if cfg.position == "rope" else None,
            cache_index=cache_index,
        )
        x, aux, _, cache = self.layers(x, inp, L.DropoutCtx(), cache)
        return self.logits_dense(self.decoder_norm(x)), aux, cache


class DecoderOnly(nnx.Module):
    """Decoder-only language model (causal or prefix LM)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.arch != "decoder_only":
            raise ValueError(f"DecoderOnly needs arch='decoder_only', got {cfg.arch!r}")
        self.cfg = cfg
        self.token_embedder = L.Embed(cfg, rngs)
        self.decoder = DecoderStack(cfg, rngs)

    def apply(
        self,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None = None,
        *,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        decoder_causal_attention: Array | None = None,
        deterministic: bool = True,
        dropout_rng: Array | None = None,
        dropout_scale=1.0,
        return_attention: bool = False,
        interventions: tuple = (),
        step=None,
    ):
        """Returns (logits [B, L, V] float32, aux [2] raw MoE losses, attention list).

        ``interventions``: :class:`interventions.Clamp` tuple, active at ``step``."""
        tok = jnp.asarray(decoder_input_tokens)
        b, n = tok.shape
        c = self.cfg
        if (
            not deterministic
            and dropout_rng is None
            and (c.dropout_rate or c.attention_dropout_rate or c.droppath_rate)
        ):
            raise ValueError("deterministic=False needs a dropout_rng (a jax PRNG key)")
        drop = L.DropoutCtx(None if deterministic else dropout_rng, dropout_scale)
        mask = L.decoder_mask(
            decoder_target_tokens, n, b, decoder_segment_ids, decoder_causal_attention
        )
        positions = None
        if c.position == "rope":
            positions = (
                jnp.asarray(decoder_positions)
                if decoder_positions is not None
                else jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
            )
        clamps = None
        if interventions:
            clamps = I.stack_clamps(
                interventions,
                "decoder",
                c,
                step,
                mask=mask,
                tokens=tok,
                unembed=self.decoder.logits_dense.kernel[...],
            )
        logits, aux, attn = self.decoder(
            self.token_embedder(tok), mask, positions, drop, return_attention, clamps
        )
        return logits, aux, [a[0] for a in attn]

    def init_cache(self, batch: int, length: int):
        """Zero K/V cache of every decoder layer for ``length`` positions."""
        return self.decoder.layers.init_cache(batch, length)

    def decode_step(self, tokens: Array, positions: Array, mask: Array, cache):
        """Feed ``tokens`` [B, q] at absolute ``positions`` [B, q] (row b's cache rows
        positions[b, 0] + 0..q-1) attending over the cache under ``mask`` [B, 1, q, T].
        Returns (logits [B, q, V] float32, new cache)."""
        x = self.token_embedder(jnp.asarray(tokens))
        logits, _, cache = self.decoder.decode(x, mask, positions, cache, positions[:, 0])
        return logits, cache

    def __call__(
        self,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None = None,
        *,
        return_attention: bool = False,
        **kw,
    ):
        """Logits [B, L, V] float32, or (logits, [per-layer [B, H, L, L]])."""
        logits, _, attn = self.apply(
            decoder_input_tokens, decoder_target_tokens, return_attention=return_attention, **kw
        )
        return (logits, attn) if return_attention else logits
