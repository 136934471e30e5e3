"""Token losses with T5X semantics (float32 throughout).

``cross_entropy`` follows ``t5x.losses.compute_weighted_cross_entropy``: soft targets
with label smoothing (confidence 1 - s on the target, s / (V - 1) elsewhere, V = the
logits' last dimension), minus the normalising constant (the entropy of the soft
target, so a perfect prediction has loss 0), plus ``z_loss * logsumexp(logits)^2`` per
token. Returned sums are weighted by ``weights``; ``loss_sum`` INCLUDES the z-loss term
(as in T5X) and ``z_loss_sum`` reports it separately. Divide by ``weight_sum`` for a mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _target_logprob(log_probs: Array, targets: Array) -> Array:
    return jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


@jax.custom_vjp
def _logit_stats(logits: Array, targets: Array) -> tuple[Array, Array, Array]:
    """Per position: (logsumexp(logits), logits[target], sum(logits)), float32 [...].

    The hand-written VJP forms the logits gradient in one fused elementwise pass,
    ``g_lse * softmax + g_tgt * onehot(target) + g_sum``, instead of autodiff's
    scatter into a zero [..., V] buffer followed by the log-softmax backward: over a
    32k vocabulary that pass is a large part of a small model's step.
    """
    return _logit_stats_fwd(logits, targets)[0]


def _onehot_mask(targets: Array, vocab: int) -> Array:
    iota = jax.lax.broadcasted_iota(jnp.int32, targets.shape + (vocab,), targets.ndim)
    return iota == targets[..., None].astype(jnp.int32)


def _logit_stats_fwd(logits, targets):
    log_z = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # forward only
    return (log_z, tgt, jnp.sum(logits, axis=-1)), (logits, targets, log_z)


def _logit_stats_bwd(res, g):
    logits, targets, log_z = res
    g_lse, g_tgt, g_sum = g
    probs = jnp.exp(logits - log_z[..., None])
    hit = _onehot_mask(targets, logits.shape[-1])
    d = g_lse[..., None] * probs + jnp.where(hit, g_tgt[..., None], 0.0) + g_sum[..., None]
    return d.astype(logits.dtype), None


_logit_stats.defvjp(_logit_stats_fwd, _logit_stats_bwd)


def cross_entropy(
    logits: Array,
    targets: Array,
    weights: Array | None = None,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
):
    """Weighted token cross entropy (T5X). Returns (loss_sum, z_loss_sum, weight_sum)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}; expected a value in [0, 1)")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} shapes disagree")
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = (1.0 - confidence) / (vocab - 1)
    normalizing = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    log_z, tgt_logit, sum_logits = _logit_stats(logits, targets.astype(jnp.int32))
    tgt = tgt_logit - log_z  # log p(target)
    if label_smoothing:
        # sum_v log p(v) = sum_v logits_v - V * log_z
        loss = -(confidence - low) * tgt - low * (sum_logits - vocab * log_z)
    else:
        loss = -tgt
    zl = z_loss * jnp.square(log_z)
    loss = loss + zl - normalizing
    if weights is None:
        weight_sum = jnp.asarray(np.prod(targets.shape), jnp.float32)
    else:
        weights = weights.astype(jnp.float32)
        loss, zl = loss * weights, zl * weights
        weight_sum = jnp.sum(weights)
    return jnp.sum(loss), jnp.sum(zl), weight_sum


def per_token_loss(logits: Array, targets: Array) -> Array:
    """Plain cross entropy per position [B, L] (nats, float32; no smoothing/z-loss)."""
    logits = logits.astype(jnp.float32)
    return -_target_logprob(jax.nn.log_softmax(logits, axis=-1), targets)


def argmax_hits(logits: Array, targets: Array) -> Array:
    """1.0 where ``jnp.argmax(logits, -1) == targets``, else 0.0 (float32 [...]).

    Exactly argmax's answer, ties and NaNs included (the first maximum wins; a NaN counts
    as the maximum), without argmax: the target is the argmax iff no earlier entry is
    >= its logit and no later entry is > it. That is one comparison pass and a
    boolean reduction over the vocabulary, where XLA:CPU's argmax is a (value, index)
    pair reduction it does not vectorise: 2x faster over a [8, 512, 32128] batch.
    """
    t = targets[..., None].astype(jnp.int32)
    lt = jnp.take_along_axis(logits, t, axis=-1)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    nan = jnp.isnan(logits)
    earlier = (logits >= lt) | nan
    later = (logits > lt) | (nan & ~jnp.isnan(lt))
    beaten = jnp.any(jnp.where(iota < t, earlier, later), axis=-1)
    return (~beaten).astype(jnp.float32)


def correct_count(logits: Array, targets: Array, weights: Array | None = None):
    """(weighted number of argmax-correct tokens, weight sum)."""
    correct = argmax_hits(logits, targets)
    if weights is None:
        return jnp.sum(correct), jnp.asarray(correct.size, jnp.float32)
    weights = weights.astype(jnp.float32)
    return jnp.sum(correct * weights), jnp.sum(weights)


def token_accuracy(logits: Array, targets: Array, weights: Array | None = None) -> Array:
    """Weighted fraction of positions whose argmax equals the target (0 if no weight)."""
    c, w = correct_count(logits, targets, weights)
    return jnp.where(w > 0, c / jnp.maximum(w, 1e-9), 0.0)
