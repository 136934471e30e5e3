"""Flax NNX models: T5 v1.1 encoder-decoder, decoder-only, attention-only, MoE, ParamShare.

Entry points used by the trainer and evaluator:

* :func:`build` (config, rngs) -> module; every parameter carries logical axis names.
* :func:`forward` (module, T5X-named features) -> (float32 logits, aux losses), where aux
  holds the MoE auxiliary losses already multiplied by their config coefficients
  (empty for dense models); add ``sum(aux.values())`` to the training loss. With
  ``interventions=`` (:func:`repeat_scaling.models.interventions.parse`) and ``step=``
  it clamps chosen attention heads (ablate / previous-token / induction / copy).
* :func:`repeat_scaling.models.decoding.greedy_decode`: batched, compiled greedy decoding
  with a per-layer key/value cache (both architectures).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx

from repeat_scaling.models.config import ModelConfig, padded_vocab_size
from repeat_scaling.models.decoder_only import DecoderOnly
from repeat_scaling.models.encoder_decoder import EncoderDecoder

__all__ = [
    "DecoderOnly",
    "EncoderDecoder",
    "ModelConfig",
    "build",
    "forward",
    "padded_vocab_size",
]

_ENC_DEC_FEATURES = (
    "encoder_segment_ids",
    "decoder_segment_ids",
    "encoder_positions",
    "decoder_positions",
)
_DEC_FEATURES = ("decoder_segment_ids", "decoder_positions", "decoder_causal_attention")


def build(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Instantiate the model described by ``cfg`` (parameters drawn from ``rngs.params``)."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"build() needs a ModelConfig, got {type(cfg).__name__}")
    if cfg.arch == "encoder_decoder":
        return EncoderDecoder(cfg, rngs)
    return DecoderOnly(cfg, rngs)


def _aux_dict(cfg: ModelConfig, aux: jax.Array) -> dict[str, jax.Array]:
    if not cfg.is_moe:
        return {}
    return {
        "moe_aux_loss": cfg.aux_loss_coef * aux[0],
        "router_z_loss": cfg.router_z_loss_coef * aux[1],
    }


def forward(
    model: nnx.Module,
    features: Mapping[str, jax.Array],
    *,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_scale=1.0,
    interventions: tuple = (),
    step=None,
):
    """Run ``model`` on a T5X feature dict; returns (logits float32, aux dict).

    Encoder-decoder needs ``encoder_input_tokens`` and ``decoder_input_tokens``;
    decoder-only needs ``decoder_input_tokens``. ``decoder_target_tokens`` (padding mask),
    segment ids, positions and ``decoder_causal_attention`` are used when present.
    ``interventions`` (from :func:`interventions.parse`) clamp attention heads; ``step``
    (python int or traced int32 scalar; None = every clamp active) selects which act.
    """
    cfg: ModelConfig = model.cfg
    need = (
        ("encoder_input_tokens", "decoder_input_tokens")
        if cfg.arch == "encoder_decoder"
        else ("decoder_input_tokens",)
    )
    missing = [k for k in need if k not in features]
    if missing:
        raise ValueError(
            f"features lack {missing} needed by a {cfg.arch} model; got {sorted(features)}"
        )
    common = dict(
        deterministic=deterministic,
        dropout_rng=dropout_rng,
        dropout_scale=dropout_scale,
        interventions=tuple(interventions),
        step=step,
    )
    targets = features.get("decoder_target_tokens")
    if cfg.arch == "encoder_decoder":
        extra = {k: features[k] for k in _ENC_DEC_FEATURES if k in features}
        logits, aux, _ = model.apply(
            features["encoder_input_tokens"],
            features["decoder_input_tokens"],
            targets,
            **extra,
            **common,
        )
    else:
        extra = {k: features[k] for k in _DEC_FEATURES if k in features}
        logits, aux, _ = model.apply(features["decoder_input_tokens"], targets, **extra, **common)
    return logits, _aux_dict(cfg, aux)
