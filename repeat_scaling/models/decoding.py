"""Batched greedy decoding with a per-layer key/value cache, compiled end to end.

:func:`greedy_decode` runs the whole loop (``lax.while_loop`` over output positions,
stopping early once every row has emitted EOS) inside one ``jax.jit``; a compiled loop is
reused for every call with the same model structure, shapes and options.

Layouts (identical to what training teaches, see ``data/objectives.py``):

* encoder-decoder: ``features["encoder_input_tokens"]`` [B, Li] (0 = padding). The decoder
  starts from id 0 (T5) and position t's output is token t.
* decoder-only: ``features["prompt_tokens"]`` [B, P], right-padded with 0, rows may differ
  in length p_b. The decoder input is ``0, prompt, generated...`` (targets shifted right);
  the output at position p_b (the last prompt token) is the first generated token. With
  ``prefix_lm=True`` positions 0..p_b attend bidirectionally (``decoder_causal_attention``
  = 1 there, as in the prefix-LM objective); ``prefix_lm=False`` is a plain causal prompt.

Cached path: the prompt is run once ("prefill", all rows at offset 0, padded keys masked),
then each step feeds one token per row at that row's own position p_b + t, writing its
keys/values (after rotary embedding) into the cache and attending over positions <= it.
Relative position bias rows are gathered per row. The encoder runs once and every
decoder layer's cross-attention keys/values are computed once (first step) and cached.
Cached steps of ``attention_impl="cudnn"`` models use the generic XLA kernel. The cache's
layout and its writes are :mod:`repeat_scaling.models.kv_cache`.

Reference path (``use_cache=False``): every step runs :func:`repeat_scaling.models.forward`
on the whole fixed-length buffer with the positions not yet generated marked as padding,
exactly the teacher-forced computation.

Mixture-of-experts: routing is per token, but expert capacity depends on the group
(sequence) length, so the cached path (groups of 1 token) and the uncached one (the whole
buffer) drop the same tokens only when nothing is dropped: with
``capacity_factor >= num_experts / top_k`` the two agree exactly (tested).

Output: int32 [B, max_decode_length]; the first EOS is kept, every later position is 0.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repeat_scaling.models import forward

Array = jax.Array


def greedy_decode(
    model: nnx.Module,
    features: Mapping[str, Array],
    *,
    max_decode_length: int,
    eos_id: int = 1,
    use_cache: bool = True,
    prefix_lm: bool = True,
    vocab_size: int | None = None,
) -> Array:
    """Greedy (argmax) decoding; returns int32 [B, max_decode_length].

    ``vocab_size`` (optional) restricts the argmax to ids < vocab_size (the real, unpadded
    vocabulary); by default every row of the padded embedding table may be produced.
    See the module docstring for the feature layouts.
    """
    cfg = model.cfg
    if isinstance(max_decode_length, bool) or not isinstance(max_decode_length, int):
        raise ValueError(f"max_decode_length={max_decode_length!r}; expected a positive int")
    if max_decode_length <= 0:
        raise ValueError(f"max_decode_length={max_decode_length}; expected a positive int")
    if vocab_size is not None and not 0 < vocab_size <= cfg.vocab_size:
        raise ValueError(f"vocab_size={vocab_size}; expected an int in [1, {cfg.vocab_size}]")
    key = "encoder_input_tokens" if cfg.arch == "encoder_decoder" else "prompt_tokens"
    if key not in features:
        raise ValueError(
            f"greedy_decode on a {cfg.arch} model needs features[{key!r}]; got {sorted(features)}"
        )
    tokens = jnp.asarray(features[key], jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"features[{key!r}] has shape {tokens.shape}; expected [batch, length>0]")
    graphdef, state = nnx.split(model)
    # eos_id / prefix_lm / vocab_size are traced: changing them never recompiles.
    return _decode(
        graphdef,
        state,
        tokens,
        jnp.int32(eos_id),
        jnp.asarray(bool(prefix_lm)),
        jnp.int32(cfg.vocab_size if vocab_size is None else vocab_size),
        max_len=max_decode_length,
        use_cache=bool(use_cache),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "use_cache"))
def _decode(graphdef, state, tokens, eos_id, prefix_lm, vocab_size, *, max_len, use_cache):
    model = nnx.merge(graphdef, state)
    b = tokens.shape[0]
    if model.cfg.arch == "encoder_decoder":
        first, carry0, step = _encoder_decoder(model, tokens, max_len, use_cache)
    else:
        first, carry0, step = _decoder_only(model, tokens, max_len, use_cache, prefix_lm)

    def pick(logits: Array) -> Array:  # [B, V] -> [B]
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    out = jnp.zeros((b, max_len), jnp.int32)
    done = jnp.zeros((b,), bool)
    t0 = 0
    last = jnp.zeros((b,), jnp.int32)
    if first is not None:  # cached: the prefill / first step already produced token 0
        tok = pick(first)
        out, done, last, t0 = out.at[:, 0].set(tok), tok == eos_id, tok, 1

    def cond(c):
        t, _, _, _, done = c
        return (t < max_len) & ~jnp.all(done)

    def body(c):
        t, carry, last, out, done = c
        logits, carry = step(t, carry, last)
        nxt = pick(logits)
        tok = jnp.where(done, 0, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], t, axis=1)
        return t + 1, carry, nxt, out, done | (nxt == eos_id)

    _, _, _, out, _ = jax.lax.while_loop(cond, body, (t0, carry0, last, out, done))
    return out


# ----------------------------------------------------------------------------------------
# Per-architecture steps: step(t, carry, last_token [B]) -> (logits [B, V], carry)
# ----------------------------------------------------------------------------------------
def _encoder_decoder(model, enc: Array, max_len: int, use_cache: bool):
    b = enc.shape[0]
    ar = jnp.arange(max_len)
    if use_cache:
        encoded = model.encode(enc)

        def step(t, cache, last, fill_cross=False):
            pos = jnp.full((b, 1), t, jnp.int32)
            mask = (ar <= t)[None, None, None, :]
            mask = jnp.broadcast_to(mask, (b, 1, 1, max_len))
            logits, cache = model.decode_step(
                last[:, None], pos, mask, cache, encoded, enc, fill_cross
            )
            return logits[:, 0], cache

        # Step 0 outside the loop computes every layer's cross-attention keys/values once.
        cache = model.init_cache(b, max_len, enc.shape[1])
        first, cache = step(0, cache, jnp.zeros((b,), jnp.int32), fill_cross=True)
        return first, cache, step

    def step_ref(t, dec, last):
        dec = jnp.where(ar[None] == t, last[:, None], dec)  # position t holds token t-1 (or 0)
        logits, _ = forward(model, {"encoder_input_tokens": enc, "decoder_input_tokens": dec})
        return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), dec

    return None, jnp.zeros((b, max_len), jnp.int32), step_ref


def _decoder_only(model, prompt: Array, max_len: int, use_cache: bool, prefix_lm: bool):
    b, p = prompt.shape
    total = p + max_len  # positions 0 .. p_b + max_len - 1 are ever fed
    ar = jnp.arange(total)
    lengths = jnp.max(jnp.where(prompt > 0, jnp.arange(1, p + 1), 0), axis=1)  # p_b
    seq = jnp.zeros((b, total), jnp.int32).at[:, 1 : p + 1].set(prompt)
    prefix = ar[None] <= lengths[:, None]  # [B, total]: 0 and the prompt
    rows = jnp.arange(b)

    if use_cache:
        # Prefill positions 0..p (row b's real ones are 0..p_b), cache rows 0..p.
        q = jnp.arange(p + 1)
        allowed = ar[None, :] <= q[:, None]  # causal [q, total]
        bidir = prefix & prefix_lm
        allowed = allowed | (bidir[:, :, None] & bidir[:, None, :])[:, : p + 1]
        mask = allowed & prefix[:, None, :] & prefix[:, : p + 1, None]
        pos = jnp.broadcast_to(q, (b, p + 1))
        logits, cache = model.decode_step(
            seq[:, : p + 1], pos, mask[:, None], model.init_cache(b, total)
        )
        first = logits[rows, lengths]

        def step(t, cache, last):
            pos = (lengths + t)[:, None]
            mask = (ar[None, :] <= pos)[:, None, None, :]
            logits, cache = model.decode_step(last[:, None], pos, mask, cache)
            return logits[:, 0], cache

        return first, cache, step

    def step_ref(t, seq, last):
        pos = lengths + t  # query position whose output is token t
        seq = jnp.where((ar[None] == pos[:, None]) & (t > 0), last[:, None], seq)
        seg = (ar[None] <= pos[:, None]).astype(jnp.int32)
        feats = {
            "decoder_input_tokens": seq,
            "decoder_segment_ids": seg,
            "decoder_positions": ar[None] * seg,
            # all zeros (plain causal) unless prefix_lm
            "decoder_causal_attention": (prefix & (seg > 0) & prefix_lm).astype(jnp.int32),
        }
        logits, _ = forward(model, feats)
        return logits[rows, pos], seq

    return None, seq, step_ref  # the loop starts at t = 0 (nothing to write yet)


def teacher_forced_features(prompt: np.ndarray, generated: np.ndarray, prefix_lm: bool = True):
    """Decoder-only training-layout features for ``prompt ++ generated`` (numpy; used to
    check decoding against a plain :func:`forward`): the output at position p_b + t must be
    ``generated[:, t]``. Returns (features, lengths p_b)."""
    prompt = np.asarray(prompt, np.int32)
    generated = np.asarray(generated, np.int32)
    b, p = prompt.shape
    n = generated.shape[1]
    lengths = np.max(np.where(prompt > 0, np.arange(1, p + 1), 0), axis=1)
    seq = np.zeros((b, p + n), np.int32)
    for r in range(b):
        seq[r, : lengths[r]] = prompt[r, : lengths[r]]
        seq[r, lengths[r] : lengths[r] + n] = generated[r]
    dec_in = np.zeros_like(seq)
    dec_in[:, 1:] = seq[:, :-1]
    ar = np.arange(p + n)
    causal = (ar[None] <= lengths[:, None]) & prefix_lm  # all 0 = plain causal (T5X)
    feats = {
        "decoder_input_tokens": dec_in,
        "decoder_positions": np.broadcast_to(ar, seq.shape).astype(np.int32),
        "decoder_causal_attention": causal.astype(np.int32),
    }
    return feats, lengths
