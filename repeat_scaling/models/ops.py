"""The layers' einsums, in two implementations chosen by ``ModelConfig.ops``.

* ``"plain"``: the einsum (or sum) itself; autodiff writes the gradients.
* ``"tuned"`` (default): the same forward computation with a hand-written VJP whose
  contractions XLA:CPU's library dot (YNNPACK) takes as plain row-major matmuls. The
  weight gradients and the key/value gradients of attention contract over tokens (or
  queries), the leading axis of both operands, which that dot does not take: left to
  itself XLA:CPU transposes the wide operand and falls back to an Eigen dot. The VJPs
  below transpose the narrow operand instead, behind an optimization barrier on CPU (see
  :func:`_pinned_on_cpu`). The measured gains are in docs/benchmarks.md.

The forward values of the two are the same computation (each tuned function calls its
plain one); gradients agree up to rounding (another summation order). The parameters do
not depend on the choice, so a checkpoint trained with one runs with the other.

A layer takes its set with :func:`of` (``self.ops = ops.of(cfg.ops)``) and calls
``self.ops.dense(x, kernel)`` etc.; each field of :class:`Ops` names its einsum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

#: The values of ``ModelConfig.ops``.
IMPLS = ("tuned", "plain")


# ----------------------------------------------------------------------------------------
# Plain: the einsums, differentiated by autodiff
# ----------------------------------------------------------------------------------------
def plain_dense(x: Array, kernel: Array) -> Array:
    """``einsum("...d,df->...f")``."""
    return jnp.einsum("...d,df->...f", x, kernel)


def plain_project_heads(x: Array, kernel: Array) -> Array:
    """``einsum("bld,dhk->blhk")`` (query, key and value projections)."""
    return jnp.einsum("bld,dhk->blhk", x, kernel)


def plain_merge_heads(ctx: Array, kernel: Array) -> Array:
    """``einsum("bqhd,hdm->bqm")`` (attention output projection)."""
    return jnp.einsum("bqhd,hdm->bqm", ctx, kernel)


def plain_project_logits(x: Array, kernel: Array) -> Array:
    """``einsum("bld,dv->blv")`` in float32."""
    return jnp.einsum("bld,dv->blv", x, kernel, preferred_element_type=jnp.float32)


def plain_attention_scores(q: Array, k: Array) -> Array:
    """``einsum("bqhd,bkhd->bhqk")`` in float32."""
    return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)


def plain_attention_context(probs: Array, v: Array) -> Array:
    """``einsum("bhqk,bkhd->bqhd")``."""
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def plain_add_bias(logits: Array, bias: Array) -> Array:
    """``logits + bias``."""
    return logits + bias


# ----------------------------------------------------------------------------------------
# Tuned: the same forward, hand-written VJPs for XLA:CPU
# ----------------------------------------------------------------------------------------
def _pinned_on_cpu(x: Array) -> Array:
    """``x`` behind an optimization barrier when compiling for CPU.

    The VJPs below transpose a small operand so that XLA:CPU's library dot gets a
    row-major matmul; without the barrier XLA folds the transpose back into the dot.
    GPU/TPU compilers choose dot layouts themselves, so there ``x`` is returned as is and
    the gradient compiles as autodiff's would.
    """
    return jax.lax.optimization_barrier(x) if jax.default_backend() == "cpu" else x


def _kernel_grad(x: Array, g: Array) -> Array:
    """``einsum("...d,...f->df", x, g)`` in float32: a kernel gradient summed over tokens.

    The narrower of the two operands is transposed to [width, tokens] (pinned on CPU), so
    the product is a plain row-major matmul.
    """
    d, f = x.shape[-1], g.shape[-1]
    x2, g2 = x.reshape(-1, d), g.reshape(-1, f)
    if d <= f:  # [d, N] @ [N, f]
        return jnp.dot(_pinned_on_cpu(x2.T), g2, preferred_element_type=jnp.float32)
    # [f, N] @ [N, d], then the small [f, d] transposed (pinned too: folded into the dot,
    # the transpose made it contract over the leading axis again, an Eigen dot on CPU)
    return _pinned_on_cpu(jnp.dot(_pinned_on_cpu(g2.T), x2, preferred_element_type=jnp.float32)).T


def _key_side_grad(a: Array, w: Array) -> Array:
    """``einsum("bqhd,bhqk->bkhd", a, w)``: a gradient on the key side of attention.

    It contracts over queries; the small operand is transposed to [B, H, d, q] (pinned on
    CPU), so it is a plain batched matmul, and the [B, H, d, k] result transposed back.
    """
    at = _pinned_on_cpu(jnp.transpose(a, (0, 2, 3, 1)))
    r = jnp.einsum("bhdq,bhqk->bhdk", at, w.astype(a.dtype), preferred_element_type=jnp.float32)
    return jnp.transpose(r, (0, 3, 1, 2)).astype(a.dtype)


def _saving_inputs(f: Callable[[Array, Array], Array]) -> Callable:
    """The forward rule of a custom VJP that keeps its two inputs for the backward."""
    return lambda a, b: (f(a, b), (a, b))


@jax.custom_vjp
def dense(x: Array, kernel: Array) -> Array:
    """:func:`plain_dense`; the kernel gradient via :func:`_kernel_grad` (for the MLP it
    transposes the d-wide inputs rather than the [tokens, d_ff] gradient)."""
    return plain_dense(x, kernel)


def _dense_bwd(res, g):
    x, kernel = res
    dx = jnp.einsum("...f,df->...d", g, kernel)
    return dx.astype(x.dtype), _kernel_grad(x, g).astype(kernel.dtype)


dense.defvjp(_saving_inputs(dense), _dense_bwd)


@jax.custom_vjp
def project_heads(x: Array, kernel: Array) -> Array:
    """:func:`plain_project_heads`; the kernel gradient via :func:`_kernel_grad` over the
    heads flattened (autodiff's contracts over tokens: an Eigen dot on CPU)."""
    return plain_project_heads(x, kernel)


def _project_heads_bwd(res, g):
    x, kernel = res
    dx = jnp.einsum("blhk,dhk->bld", g, kernel)
    dk = _kernel_grad(x, g.reshape(*g.shape[:-2], -1)).reshape(kernel.shape)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


project_heads.defvjp(_saving_inputs(project_heads), _project_heads_bwd)


@jax.custom_vjp
def merge_heads(ctx: Array, kernel: Array) -> Array:
    """:func:`plain_merge_heads`; the kernel gradient via :func:`_kernel_grad` over the
    heads flattened."""
    return plain_merge_heads(ctx, kernel)


def _merge_heads_bwd(res, g):
    ctx, kernel = res
    dctx = jnp.einsum("bqm,hdm->bqhd", g, kernel)
    dk = _kernel_grad(ctx.reshape(*ctx.shape[:-2], -1), g).reshape(kernel.shape)
    return dctx.astype(ctx.dtype), dk.astype(kernel.dtype)


merge_heads.defvjp(_saving_inputs(merge_heads), _merge_heads_bwd)


@jax.custom_vjp
def project_logits(x: Array, kernel: Array) -> Array:
    """:func:`plain_project_logits`; the kernel gradient via :func:`_kernel_grad`, which
    transposes the d-wide inputs rather than the [B*L, V] logits gradient."""
    return plain_project_logits(x, kernel)


def _project_logits_bwd(res, g):
    x, kernel = res
    gc = g.astype(x.dtype)
    dx = jnp.einsum("blv,dv->bld", gc, kernel, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), _kernel_grad(x, gc).astype(kernel.dtype)


project_logits.defvjp(_saving_inputs(project_logits), _project_logits_bwd)


@jax.custom_vjp
def attention_scores(q: Array, k: Array) -> Array:
    """:func:`plain_attention_scores`; the key gradient via :func:`_key_side_grad`."""
    return plain_attention_scores(q, k)


def _attention_scores_bwd(res, g):
    q, k = res
    gc = g.astype(q.dtype)
    dq = jnp.einsum("bhqk,bkhd->bqhd", gc, k, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), _key_side_grad(q, gc).astype(k.dtype)


attention_scores.defvjp(_saving_inputs(attention_scores), _attention_scores_bwd)


@jax.custom_vjp
def attention_context(probs: Array, v: Array) -> Array:
    """:func:`plain_attention_context`; the value gradient via :func:`_key_side_grad`."""
    return plain_attention_context(probs, v)


def _attention_context_bwd(res, g):
    probs, v = res
    dp = jnp.einsum("bqhd,bkhd->bhqk", g, v, preferred_element_type=jnp.float32)
    return dp.astype(probs.dtype), _key_side_grad(g, probs).astype(v.dtype)


attention_context.defvjp(_saving_inputs(attention_context), _attention_context_bwd)


@jax.custom_vjp
def add_bias(logits: Array, bias: Array) -> Array:
    """:func:`plain_add_bias` for attention logits [B, H, q, k] and a bias broadcast over
    the batch ([1, H, q, k], the relative-position bias shared by a stack's layers).

    The VJP sums the bias gradient over the batch as a contraction with a ones vector.
    As a plain ``sum``, XLA:CPU fused the batch reductions of every unrolled layer, the
    softmax backward that produces them and the Toeplitz backward of
    :class:`~repeat_scaling.models.layers.RelativePositionBias` into one loop that
    strides over all of them; the dot keeps each layer's reduction separate.
    """
    return plain_add_bias(logits, bias)


def _add_bias_fwd(logits, bias):
    # The bias (alive anyway) carries its shape and dtype; a scalar carries the logits'.
    return logits + bias, (bias, jnp.zeros((), logits.dtype))


def _add_bias_bwd(res, g):
    bias, like_logits = res
    axes = tuple(i for i, n in enumerate(bias.shape) if n == 1 and g.shape[i] != 1)
    if axes == (0,):
        db = jnp.einsum("b,b...->...", jnp.ones(g.shape[0], g.dtype), g)[None]
    elif axes:
        db = jnp.sum(g, axis=axes, keepdims=True)
    else:
        db = g
    return g.astype(like_logits.dtype), db.astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


# ----------------------------------------------------------------------------------------
# The switch
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Ops:
    """One implementation of each einsum the layers take from this module."""

    dense: Callable[[Array, Array], Array]  # "...d,df->...f" (MLP)
    project_heads: Callable[[Array, Array], Array]  # "bld,dhk->blhk" (q, k, v)
    merge_heads: Callable[[Array, Array], Array]  # "bqhd,hdm->bqm" (attention output)
    project_logits: Callable[[Array, Array], Array]  # "bld,dv->blv", float32 (logits)
    attention_scores: Callable[[Array, Array], Array]  # "bqhd,bkhd->bhqk", float32
    attention_context: Callable[[Array, Array], Array]  # "bhqk,bkhd->bqhd"
    add_bias: Callable[[Array, Array], Array]  # logits + bias (relative-position bias)


TUNED = Ops(
    dense,
    project_heads,
    merge_heads,
    project_logits,
    attention_scores,
    attention_context,
    add_bias,
)
PLAIN = Ops(
    plain_dense,
    plain_project_heads,
    plain_merge_heads,
    plain_project_logits,
    plain_attention_scores,
    plain_attention_context,
    plain_add_bias,
)
_BY_NAME = {"tuned": TUNED, "plain": PLAIN}


def of(name: str) -> Ops:
    """The :class:`Ops` of a name in :data:`IMPLS` (ValueError for any other)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"ops={name!r}; expected one of {IMPLS}") from None
