"""T5 v1.1 encoder-decoder (T5X `t5x/examples/t5/network.py` semantics) in Flax NNX.

Parameter tree (T5X names)::

    token_embedder/embedding                       [vocab, embed]
    encoder/relpos_bias/rel_embedding              [heads, buckets]
    encoder/layers/...                             (see layers.LayerStack)
    encoder/encoder_norm/scale                     [embed]
    decoder/relpos_bias/rel_embedding              [heads, buckets]
    decoder/layers/...
    decoder/decoder_norm/scale                     [embed]
    decoder/logits_dense/kernel                    [embed, vocab]

Masks: encoder padding (id 0) is masked everywhere; decoder self-attention is causal and,
when ``decoder_target_tokens`` is given, masks its padding (T5X); segment ids restrict
attention to the same packed segment. Logits are float32 [B, Lt, padded_vocab].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from repeat_scaling.models import interventions as I
from repeat_scaling.models import layers as L
from repeat_scaling.models.config import ModelConfig

Array = jax.Array

_SITE_ENC, _SITE_DEC = 11, 12
_SITE_EMB, _SITE_FINAL, _SITE_STACK = 1, 2, 3


class Encoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.relpos_bias = L.RelativePositionBias(cfg, bidirectional=True, rngs=rngs)
        self.layers = L.LayerStack(cfg, cfg.num_encoder_layers, rngs, cross_attention=False)
        self.encoder_norm = L.RMSNorm(cfg.d_model, cfg, rngs)

    def __call__(
        self, x: Array, mask: Array, drop: L.DropoutCtx, return_attention: bool, clamps=None
    ):
        cfg = self.cfg
        x = L.dropout(x, cfg.dropout_rate, drop.sub(_SITE_EMB).key, drop.scale)
        bias = self.relpos_bias(x.shape[1], x.shape[1])
        inp = L.LayerInputs(mask=mask, bias=bias, return_attention=return_attention, clamps=clamps)
        x, aux, attn = self.layers(x, inp, drop.sub(_SITE_STACK))
        x = self.encoder_norm(x)
        x = L.dropout(x, cfg.dropout_rate, drop.sub(_SITE_FINAL).key, drop.scale)
        return x, aux, attn


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.relpos_bias = L.RelativePositionBias(cfg, bidirectional=False, rngs=rngs)
        self.layers = L.LayerStack(cfg, cfg.num_decoder_layers, rngs, cross_attention=True)
        self.decoder_norm = L.RMSNorm(cfg.d_model, cfg, rngs)
        self.logits_dense = L.LogitsDense(cfg, rngs)

    def __call__(
        self,
        x: Array,
        encoded: Array,
        mask: Array,
        cross_mask: Array,
        drop: L.DropoutCtx,
        return_attention: bool,
        clamps=None,
    ):
        cfg = self.cfg
        x = L.dropout(x, cfg.dropout_rate, drop.sub(_SITE_EMB).key, drop.scale)
        bias = self.relpos_bias(x.shape[1], x.shape[1])
        inp = L.LayerInputs(
            mask=mask,
            bias=bias,
            encoded=encoded,
            cross_mask=cross_mask,
            return_attention=return_attention,
            clamps=clamps,
        )
        x, aux, attn = self.layers(x, inp, drop.sub(_SITE_STACK))
        x = self.decoder_norm(x)
        x = L.dropout(x, cfg.dropout_rate, drop.sub(_SITE_FINAL).key, drop.scale)
        return self.logits_dense(x), aux, attn

    def decode(self, x, encoded, mask, cross_mask, positions, cache, cache_index, fill_cross):
        """Incremental step: x [B, q, embed] at absolute ``positions`` [B, q], self mask
        [B, 1, q, T], cross mask [B, 1, q, Li]; ``fill_cross`` computes the encoder
        keys/values into the cache (first step). Returns (logits, new cache)."""
        inp = L.LayerInputs(
            mask=mask,
            bias=self.relpos_bias.rows(positions, mask.shape[-1]),
            encoded=encoded,
            cross_mask=cross_mask,
            cache_index=cache_index,
            fill_cross=fill_cross,
        )
        x, _, _, cache = self.layers(x, inp, L.DropoutCtx(), cache)
        return self.logits_dense(self.decoder_norm(x)), cache


class EncoderDecoder(nnx.Module):
    """T5 v1.1 encoder-decoder transformer."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.arch != "encoder_decoder":
            raise ValueError(f"EncoderDecoder needs arch='encoder_decoder', got {cfg.arch!r}")
        self.cfg = cfg
        self.token_embedder = L.Embed(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)
        self.decoder = Decoder(cfg, rngs)

    def apply(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None = None,
        *,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        decoder_positions: Array | None = None,
        deterministic: bool = True,
        dropout_rng: Array | None = None,
        dropout_scale=1.0,
        return_attention: bool = False,
        interventions: tuple = (),
        step=None,
    ):
        """Returns (logits [B, Lt, V] float32, aux [2] raw MoE losses, attention dict).

        ``interventions``: :class:`interventions.Clamp` tuple (encoder or decoder
        self-attention), active at ``step``."""
        del encoder_positions, decoder_positions  # relative bias is translation invariant
        enc_tok = jnp.asarray(encoder_input_tokens)
        dec_tok = jnp.asarray(decoder_input_tokens)
        b, li = enc_tok.shape
        lt = dec_tok.shape[1]
        key = None if deterministic else dropout_rng
        if not deterministic and dropout_rng is None and self._needs_rng():
            raise ValueError("deterministic=False needs a dropout_rng (a jax PRNG key)")
        drop = L.DropoutCtx(key, dropout_scale)

        enc_valid = enc_tok > 0
        enc_mask = L.attention_mask(enc_valid, enc_valid)
        if encoder_segment_ids is not None:
            enc_mask = enc_mask & L.segment_mask(encoder_segment_ids, encoder_segment_ids)
        dec_mask = L.decoder_mask(decoder_target_tokens, lt, b, decoder_segment_ids)
        q_valid = (
            decoder_target_tokens > 0
            if decoder_target_tokens is not None
            else jnp.ones((b, lt), bool)
        )
        cross_mask = L.attention_mask(q_valid, enc_valid)
        if encoder_segment_ids is not None and decoder_segment_ids is not None:
            cross_mask = cross_mask & L.segment_mask(decoder_segment_ids, encoder_segment_ids)

        clamps = {"encoder": None, "decoder": None}
        if interventions:
            for name, m, t in (("encoder", enc_mask, enc_tok), ("decoder", dec_mask, dec_tok)):
                clamps[name] = I.stack_clamps(
                    interventions,
                    name,
                    self.cfg,
                    step,
                    mask=m,
                    tokens=t,
                    unembed=self.decoder.logits_dense.kernel[...],
                )
        encoded, aux_e, attn_e = self.encoder(
            self.token_embedder(enc_tok),
            enc_mask,
            drop.sub(_SITE_ENC),
            return_attention,
            clamps["encoder"],
        )
        logits, aux_d, attn_d = self.decoder(
            self.token_embedder(dec_tok),
            encoded,
            dec_mask,
            cross_mask,
            drop.sub(_SITE_DEC),
            return_attention,
            clamps["decoder"],
        )
        attn = {}
        if return_attention:
            attn = {
                "encoder": [a[0] for a in attn_e],
                "decoder_self": [a[0] for a in attn_d],
                "decoder_cross": [a[1] for a in attn_d],
            }
        return logits, aux_e + aux_d, attn

    def encode(self, encoder_input_tokens: Array) -> Array:
        """Encoder output [B, Li, embed] (deterministic; id 0 = padding)."""
        tok = jnp.asarray(encoder_input_tokens)
        valid = tok > 0
        encoded, _, _ = self.encoder(
            self.token_embedder(tok), L.attention_mask(valid, valid), L.DropoutCtx(), False
        )
        return encoded

    def init_cache(self, batch: int, length: int, encoded_length: int):
        """Zero K/V cache of every decoder layer: self-attention for ``length`` positions,
        cross-attention keys/values for ``encoded_length`` encoder positions."""
        return self.decoder.layers.init_cache(batch, length, encoded_length)

    def decode_step(
        self, tokens, positions, mask, cache, encoded, encoder_input_tokens, fill_cross=False
    ):
        """Feed decoder ``tokens`` [B, q] at ``positions`` [B, q] over the cache (self mask
        [B, 1, q, T]) and ``encoded``; ``fill_cross=True`` on the first step stores the
        cross-attention keys/values of ``encoded`` in the cache (later steps reuse them).
        Returns (logits [B, q, V] float32, new cache)."""
        enc_valid = jnp.asarray(encoder_input_tokens) > 0
        q_valid = jnp.ones(positions.shape, bool)
        x = self.token_embedder(jnp.asarray(tokens))
        return self.decoder.decode(
            x,
            encoded,
            mask,
            L.attention_mask(q_valid, enc_valid),
            positions,
            cache,
            positions[:, 0],
            fill_cross,
        )

    def _needs_rng(self) -> bool:
        c = self.cfg
        return bool(c.dropout_rate or c.attention_dropout_rate or c.droppath_rate)

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None = None,
        *,
        return_attention: bool = False,
        **kw,
    ):
        """Logits [B, Lt, V] float32, or (logits, attention dict) with return_attention."""
        logits, _, attn = self.apply(
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            return_attention=return_attention,
            **kw,
        )
        return (logits, attn) if return_attention else logits
