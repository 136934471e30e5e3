"""The copying score of every decoder self-attention head, read from the model's weights
(the OV circuit; the score itself is :func:`repeat_scaling.eval.probes.copying_scores`)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from repeat_scaling.eval import probes
from repeat_scaling.models.config import ModelConfig


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x[...] if hasattr(x, "value") else x), np.float64)


def ov_weights(model, cfg: ModelConfig) -> dict[str, Any]:
    """Embedding, unembedding, final-norm scale and per-layer (pre-norm scale, value,
    output) of the decoder self-attention, read from the module (any layer-stack mode:
    scanned, unrolled list, ParamShare, MoE groups)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dec = params["decoder"]
    stack = model.decoder.layers  # models.layers.LayerStack
    tree = dec["layers"]["layers"]
    if stack.mode == "list":
        units = [tree[k] for k in sorted(tree, key=int)]
    elif stack.mode == "shared":
        units = [tree] * stack.num_units
    else:  # scan: leading "layers" axis on every leaf
        units = [
            jax.tree.map(lambda a, i=i: np.asarray(jax.device_get(a))[i], tree)
            for i in range(stack.num_units)
        ]

    def one(layer):
        return (
            _np(layer["pre_self_attention_layer_norm"]["scale"]),
            _np(layer["self_attention"]["value"]),
            _np(layer["self_attention"]["out"]),
        )

    layers = []
    for u in units:
        if stack.group > 1:
            layers.extend(one(u["layers"][j]) for j in sorted(u["layers"], key=int))
        else:
            layers.append(one(u))
    return {
        "embedding": _np(params["token_embedder"]["embedding"]),
        "unembedding": _np(dec["logits_dense"]["kernel"]),
        "final_scale": _np(dec["decoder_norm"]["scale"]),
        "layers": layers,
    }


def copying_scores_of(
    model, cfg: ModelConfig, token_ids: np.ndarray, vocab_size: int | None = None
) -> list[list[float]]:
    """``[layers][heads]`` OV copying scores of the decoder self-attention heads.

    ``vocab_size``: the real (unpadded) vocabulary size; logits of padding ids are ignored.
    """
    w = ov_weights(model, cfg)
    out = []
    for pre, value, output in w["layers"]:
        out.append(
            probes.copying_scores(
                w["embedding"],
                value,
                output,
                w["unembedding"],
                token_ids,
                pre_scale=pre,
                final_scale=w["final_scale"],
                vocab_size=vocab_size,
            ).tolist()
        )
    return out
