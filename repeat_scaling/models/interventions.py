"""Attention interventions ("clamping", "optogenetics"): force what chosen heads do.

A :class:`Clamp` names one self-attention head (``stack``, ``layer``, ``head``, all
0-based) and a half-open training-step window ``start_step <= step < end_step``
(``end_step=-1``: forever). :func:`parse` validates clamps from a config; pass them to
``models.forward(model, features, interventions=clamps, step=step)``. The step may be a
traced int32 scalar: which clamps are active is decided with masks inside the compiled
computation (a ``[num_layers, num_heads]`` table of kind codes per stack, indexed by the
(traced, under ``scan_layers``) layer index), so a clamp switching on or off never
recompiles. ``step=None`` makes every clamp active whatever its window. Clamped forwards
always use the einsum attention path (``attention_impl`` is ignored while a stack has
clamps); ``return_attention=True`` returns the clamped weights.

Semantics, per kind (``q`` a query position, keys ``k``; "allowed" = the model's own
attention mask: causal / prefix-LM, padding and packed segments):

``ablate``
    the head's context vector (its output before the output projection) is zero; its
    attention weights are left as computed.
``previous_token``
    the attention pattern is one-hot on key ``q-1`` when that key is allowed (same
    segment), else on ``q`` itself (the first token of a segment attends to itself).
``induction``
    one-hot on key ``j+1``, where ``j < q`` is the most recent earlier allowed position
    whose token equals the token at ``q`` (tokens = the stack's input ids:
    ``decoder_input_tokens`` or ``encoder_input_tokens``). With no earlier occurrence the
    head attends to the first allowed key of the query's row (the segment's first
    position), a fixed "null" target like the BOS sink of trained induction heads.
``copy``
    "a perfect copy of the attended token": the head keeps its own attention weights ``w``
    but its output is replaced by ``||x_q|| * sum_k w[q, k] * u(tok_k)``, where ``u(t)``
    is the unit-norm column ``t`` of the model's output (logits) projection and ``x_q``
    is the layer's residual-stream input at ``q``. Writing ``u(t)`` raises the logit of
    ``t`` (up to the final RMSNorm's per-feature scale, ignored here); scaling to the
    residual norm makes the write comparable to everything else in the stream at any
    depth. For an encoder stack the decoder's output projection is used (shared vocab).

If several active clamps name the same head, the last one in the list wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repeat_scaling.models.config import ModelConfig

Array = jax.Array

KINDS = ("ablate", "previous_token", "induction", "copy")
STACKS = ("decoder", "encoder")
NONE, ABLATE, PREVIOUS_TOKEN, INDUCTION, COPY = 0, 1, 2, 3, 4
CODES = {"ablate": ABLATE, "previous_token": PREVIOUS_TOKEN, "induction": INDUCTION, "copy": COPY}


@dataclasses.dataclass(frozen=True)
class Clamp:
    """One clamped head; active while ``start_step <= step < end_step`` (-1: forever)."""

    kind: str
    layer: int
    head: int
    start_step: int = 0
    end_step: int = -1
    stack: str = "decoder"

    def active(self, step: Any) -> Any:
        """Whether the clamp acts at ``step`` (python bool for an int/None, else traced)."""
        if step is None:
            return True
        on = step >= self.start_step
        return on if self.end_step == -1 else on & (step < self.end_step)


_FIELDS = tuple(f.name for f in dataclasses.fields(Clamp))


def _as_dict(entry: Any, i: int) -> dict[str, Any]:
    if isinstance(entry, Clamp):
        return dataclasses.asdict(entry)
    if hasattr(entry, "to_dict"):  # ml_collections ConfigDict / FrozenConfigDict
        entry = entry.to_dict()
    if not isinstance(entry, Mapping):
        raise ValueError(
            f"interventions[{i}]={entry!r}; expected a dict with fields {list(_FIELDS)}"
        )
    return dict(entry)


def parse(specs: Sequence[Any] | None, cfg: ModelConfig) -> tuple[Clamp, ...]:
    """Validate clamp specs (None, or a list of dicts / Clamps) against ``cfg``.

    Raises ValueError naming the first bad entry, e.g.
    ``interventions[1].head=9; expected a head in [0, 4)``.
    """
    if specs is None:
        return ()
    if isinstance(specs, (Mapping, Clamp, str)) or hasattr(specs, "to_dict"):
        raise ValueError(f"interventions={specs!r}; expected a list of clamp dicts")
    out = []
    for i, entry in enumerate(specs):
        d = _as_dict(entry, i)
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise ValueError(
                f"interventions[{i}] has unknown field(s) {unknown}; expected {list(_FIELDS)}"
            )
        for f in ("kind", "layer", "head"):
            if f not in d:
                raise ValueError(
                    f"interventions[{i}] lacks {f!r}; expected fields kind, layer, head"
                )

        def bad(field: str, expected: str, i=i, d=d) -> None:
            raise ValueError(f"interventions[{i}].{field}={d[field]!r}; expected {expected}")

        d.setdefault("stack", "decoder")
        d.setdefault("start_step", 0)
        d.setdefault("end_step", -1)
        if d["kind"] not in KINDS:
            bad("kind", f"one of {KINDS}")
        if d["stack"] not in STACKS:
            bad("stack", f"one of {STACKS}")
        if d["stack"] == "encoder" and cfg.arch != "encoder_decoder":
            bad("stack", "'decoder' for a decoder_only model")
        n = cfg.num_encoder_layers if d["stack"] == "encoder" else cfg.num_decoder_layers
        for f in ("layer", "head", "start_step", "end_step"):
            if isinstance(d[f], bool) or not isinstance(d[f], (int, np.integer)):
                bad(f, "an int")
        if not 0 <= d["layer"] < n:
            bad("layer", f"a layer in [0, {n})")
        if not 0 <= d["head"] < cfg.num_heads:
            bad("head", f"a head in [0, {cfg.num_heads})")
        if d["start_step"] < 0:
            bad("start_step", "a step >= 0")
        if d["end_step"] != -1 and d["end_step"] <= d["start_step"]:
            bad("end_step", f"-1 (forever) or a step > start_step={d['start_step']}")
        out.append(
            Clamp(**{k: (int(v) if k not in ("kind", "stack") else v) for k, v in d.items()})
        )
    return tuple(out)


def active(clamps: Sequence[Clamp], step: Any) -> Array:
    """Bool [len(clamps)]: which clamps act at ``step`` (traced or python int / None)."""
    return jnp.asarray([c.active(step) for c in clamps], bool).reshape(len(clamps))


def code_table(
    clamps: Sequence[Clamp], stack: str, num_layers: int, num_heads: int, step: Any
) -> Array:
    """int32 [num_layers, num_heads] kind codes (0 = unclamped) of the active clamps."""
    table = jnp.zeros((num_layers, num_heads), jnp.int32)
    for c in clamps:
        if c.stack != stack:
            continue
        on = c.active(step)
        table = table.at[c.layer, c.head].set(jnp.where(on, CODES[c.kind], table[c.layer, c.head]))
    return table


# ----------------------------------------------------------------------------------------
# Forced patterns. mask: bool [B, q, k]; q_pos: absolute key index of each query [B, q].
# ----------------------------------------------------------------------------------------
def previous_token_pattern(mask: Array, q_pos: Array) -> Array:
    """float32 [B, q, k]: one-hot on key q-1 if allowed, else on q itself."""
    prev = q_pos - 1
    ok = (prev >= 0) & jnp.take_along_axis(mask, jnp.maximum(prev, 0)[..., None], -1)[..., 0]
    return jax.nn.one_hot(jnp.where(ok, prev, q_pos), mask.shape[-1], dtype=jnp.float32)


def induction_pattern(mask: Array, q_pos: Array, q_tokens: Array, k_tokens: Array) -> Array:
    """float32 [B, q, k]: one-hot on j+1 for the latest allowed j < q with tok[j] == tok[q];
    the first allowed key of the row when there is none."""
    ar = jnp.arange(mask.shape[-1])
    match = (k_tokens[:, None, :] == q_tokens[:, :, None]) & (ar < q_pos[..., None]) & mask
    last = jnp.max(jnp.where(match, ar, -1), axis=-1)
    first = jnp.argmax(mask, axis=-1)
    return jax.nn.one_hot(jnp.where(last >= 0, last + 1, first), mask.shape[-1], dtype=jnp.float32)


@dataclasses.dataclass
class StackClamps:
    """Traced per-stack intervention data carried by ``layers.LayerInputs.clamps``."""

    codes: Array  # int32 [num_layers, num_heads]
    previous_token: Array | None = None  # float32 [B, q, k] forced pattern
    induction: Array | None = None  # float32 [B, q, k]
    copy_dirs: Array | None = None  # float32 [B, k, embed]: unit unembedding of key tokens


def stack_clamps(
    clamps: Sequence[Clamp],
    stack: str,
    cfg: ModelConfig,
    step: Any,
    *,
    mask: Array,
    tokens: Array,
    unembed: Array,
) -> StackClamps | None:
    """Build one stack's :class:`StackClamps` (None when no clamp names this stack).

    ``mask`` bool [B | 1, 1, L, L]; ``tokens`` int [B, L] (the stack's input ids);
    ``unembed`` the output projection kernel [embed, vocab].
    """
    mine = [c for c in clamps if c.stack == stack]
    if not mine:
        return None
    n = cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
    kinds = {c.kind for c in mine}
    b, length = tokens.shape
    m = jnp.broadcast_to(mask, (b, 1, length, length))[:, 0]
    q_pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    sc = StackClamps(code_table(mine, stack, n, cfg.num_heads, step))
    if "previous_token" in kinds:
        sc.previous_token = previous_token_pattern(m, q_pos)
    if "induction" in kinds:
        sc.induction = induction_pattern(m, q_pos, tokens, tokens)
    if "copy" in kinds:
        u = jnp.take(unembed.astype(jnp.float32).T, tokens, axis=0, mode="clip")  # [B, L, d]
        sc.copy_dirs = u * jax.lax.rsqrt(jnp.sum(u * u, axis=-1, keepdims=True) + 1e-12)
    return sc


def _head_is(codes: Array, code: int) -> Array:
    return (codes == code)[None, :, None, None]  # broadcast over [B, H, q, k]


def clamp_weights(weights: Array, clamp: tuple) -> Array:
    """Replace the attention weights [B, H, q, k] of previous-token / induction heads."""
    sc, codes, _ = clamp
    if sc.previous_token is not None:
        weights = jnp.where(_head_is(codes, PREVIOUS_TOKEN), sc.previous_token[:, None], weights)
    if sc.induction is not None:
        weights = jnp.where(_head_is(codes, INDUCTION), sc.induction[:, None], weights)
    return weights


def clamp_context(ctx: Array, weights: Array, clamp: tuple) -> tuple[Array, Array | None]:
    """Zero the context [B, q, H, kv] of ablated and copy heads; returns (ctx, copied
    [B, q, embed] float32 to add after the output projection, or None)."""
    sc, codes, resid = clamp
    off = (codes == ABLATE) | (codes == COPY)
    ctx = jnp.where(off[None, None, :, None], jnp.zeros((), ctx.dtype), ctx)
    if sc.copy_dirs is None:
        return ctx, None
    w = jnp.sum(jnp.where(_head_is(codes, COPY), weights, 0.0), axis=1)  # [B, q, k]
    copied = jnp.einsum("bqk,bkd->bqd", w, sc.copy_dirs)
    norm = jnp.sqrt(jnp.sum(jnp.square(resid.astype(jnp.float32)), axis=-1, keepdims=True))
    return ctx, copied * norm
