"""Named model sizes, parameter counts and FLOP accounting.

Named sizes (``get(name)``):

* T5 v1.1: ``t5_small`` ... ``t5_xxl`` (REFERENCE.md section 2; vocab 32128, d_kv 64).
* Decoder-only family ``d1m`` ... ``d800m`` spanning Hernandez et al.'s 1.57M-805M range
  (the number is roughly the NON-embedding parameter count); RoPE positions, gated-GeLU
  MLP with d_ff = 8/3 d_model rounded up to a multiple of 64 (so MLP params equal a
  4x-wide ungated MLP), head_dim 64.
* Tiny CPU sizes for demos/tests/CPU campaigns: ``t5_tiny``, ``dec_micro``, ``dec_tiny``,
  ``dec_mini``, ``attn2_tiny`` (2-layer
  attention-only), MoE variants ``t5_small_moe8``, ``t5_base_moe8``, ``dec_tiny_moe``,
  ParamShare variants ``t5_base_share``, ``dec_tiny_share``.

The ``vocab_size`` of a named size is a default: the trainer replaces it by the padded
vocabulary of the data (``cfg.replace(vocab_size=padded_vocab_size(n))``).

FLOPs (REFERENCE.md section 5): forward = 2 x (matmul parameters touched per token) +
attention 2 x 2 x S x d_attn per layer (S = attended length; causal self-attention
halved). Encoder-decoder adds cross-attention over the encoder length and the K/V
projections of the encoder output in every decoder layer. Train = 3 x forward. Embedding
lookups are not matmuls (0 FLOPs); the output projection is. MoE layers count the router
and ``top_k`` experts per token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from repeat_scaling.models.config import ModelConfig

_T5 = dict(arch="encoder_decoder", vocab_size=32128, head_dim=64, position="relative")


def _t5(name: str, d: int, ff: int, h: int, n: int, **kw) -> ModelConfig:
    return ModelConfig(
        name=name,
        d_model=d,
        d_ff=ff,
        num_heads=h,
        num_encoder_layers=n,
        num_decoder_layers=n,
        **{**_T5, **kw},
    )


def _ff(d: int) -> int:
    return int(math.ceil(8 * d / 3 / 64) * 64)


def _dec(name: str, d: int, n: int, h: int | None = None, **kw) -> ModelConfig:
    base = dict(
        arch="decoder_only", vocab_size=32128, position="rope", head_dim=64, num_encoder_layers=0
    )
    base.update(kw)
    return ModelConfig(
        name=name,
        d_model=d,
        d_ff=base.pop("d_ff", _ff(d)),
        num_heads=h or max(1, d // 64),
        num_decoder_layers=n,
        **base,
    )


_SIZES: dict[str, ModelConfig] = {}


def _register(cfg: ModelConfig) -> None:
    _SIZES[cfg.name] = cfg


for _c in [
    _t5("t5_small", 512, 1024, 6, 8),
    _t5("t5_base", 768, 2048, 12, 12),
    _t5("t5_large", 1024, 2816, 16, 24),
    _t5("t5_xl", 2048, 5120, 32, 24),
    _t5("t5_xxl", 4096, 10240, 64, 24),
    _t5("t5_small_moe8", 512, 1024, 6, 8, num_experts=8, top_k=1, moe_every=2),
    _t5("t5_base_moe8", 768, 2048, 12, 12, num_experts=8, top_k=1, moe_every=2),
    _t5("t5_base_share", 768, 2048, 12, 12, param_share=True),
    _t5("t5_tiny", 64, 128, 4, 2, vocab_size=384, head_dim=16),
    _t5(
        "t5_tiny_moe",
        64,
        128,
        4,
        2,
        vocab_size=384,
        head_dim=16,
        num_experts=4,
        top_k=2,
        moe_every=2,
    ),
    # Decoder-only family (~ non-embedding params in the name), Hernandez 1.57M..805M.
    _dec("d1m", 128, 6, 2),
    _dec("d3m", 192, 6, 3),
    _dec("d10m", 320, 8, 5),
    _dec("d25m", 448, 10, 7),
    _dec("d85m", 768, 12, 12),
    _dec("d300m", 1024, 24, 16),
    _dec("d800m", 1536, 28, 24),
    _dec("d1b", 2048, 20, 16, head_dim=128),
    # CPU campaign sizes (byte vocabulary): ~0.3x, 1x and 3.7x dec_tiny's parameters.
    _dec("dec_micro", 32, 2, 4, vocab_size=384, head_dim=8, d_ff=64),
    _dec("dec_tiny", 64, 2, 4, vocab_size=384, head_dim=16, d_ff=128),
    _dec("dec_mini", 128, 2, 4, vocab_size=384, head_dim=32, d_ff=256),
    _dec(
        "dec_tiny_moe",
        64,
        2,
        4,
        vocab_size=384,
        head_dim=16,
        d_ff=128,
        num_experts=4,
        top_k=2,
        moe_every=2,
    ),
    _dec("dec_tiny_share", 64, 4, 4, vocab_size=384, head_dim=16, d_ff=128, param_share=True),
    _dec("attn2_tiny", 64, 2, 4, vocab_size=384, head_dim=16, attention_only=True, d_ff=0),
]:
    _register(_c)


def names() -> list[str]:
    """All named sizes."""
    return sorted(_SIZES)


def get(name: str) -> ModelConfig:
    """The ModelConfig of a named size."""
    if name not in _SIZES:
        raise ValueError(f"unknown model size {name!r}; expected one of {names()}")
    return _SIZES[name]


# ----------------------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------------------
def _abstract_state(cfg: ModelConfig):
    from repeat_scaling.models import build

    return nnx.state(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))), nnx.Param)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from abstract shapes (nothing allocated).

    * ``trainable``: distinct stored parameters (a ParamShare stack counted once);
    * ``total``: parameters as applied (a shared layer counted once per use, i.e. the
      equal-FLOPs unshared model); equals ``trainable`` without ParamShare;
    * ``non_embedding``: ``total`` minus the token embedding and output projection.
    """
    flat = nnx.to_flat_state(_abstract_state(cfg))
    trainable = total = embedding = 0
    for path, v in flat:
        n = int(np.prod(v.shape))
        names = [str(p) for p in path]
        uses = 1
        if cfg.param_share and "layers" in names:
            stack = "encoder" if names[0] == "encoder" else "decoder"
            layers = cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
            uses = layers // (cfg.moe_every if cfg.is_moe else 1)
        trainable += n
        total += n * uses
        if names[0] == "token_embedder" or "logits_dense" in names:
            embedding += n
    return {"total": total, "non_embedding": total - embedding, "trainable": trainable}


# ----------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------
def _check_lengths(cfg: ModelConfig, lengths: Mapping[str, int]) -> tuple[int, int]:
    need = ("encoder", "decoder") if cfg.arch == "encoder_decoder" else ("decoder",)
    for k in need:
        if k not in lengths or int(lengths[k]) <= 0:
            raise ValueError(
                f"lengths={dict(lengths)} needs a positive {k!r} length for a {cfg.arch} model"
            )
    return int(lengths.get("encoder", 0)), int(lengths["decoder"])


def _mlp_params_per_token(cfg: ModelConfig, layer: int) -> int:
    if cfg.attention_only:
        return 0
    dense = 3 * cfg.d_model * cfg.d_ff
    if cfg.is_moe_layer(layer):
        return cfg.top_k * dense + cfg.d_model * cfg.num_experts
    return dense


def flops_per_example(cfg: ModelConfig, lengths: Mapping[str, int]) -> dict[str, float]:
    """Model FLOPs for one example: {"forward", "train"} (train = 3 x forward)."""
    li, lt = _check_lengths(cfg, lengths)
    d, da = cfg.d_model, cfg.num_heads * cfg.head_dim
    attn_proj = 4 * d * da  # q, k, v, out
    fwd = 0.0
    if cfg.arch == "encoder_decoder":
        for i in range(cfg.num_encoder_layers):
            per_tok = 2 * (attn_proj + _mlp_params_per_token(cfg, i)) + 4 * li * da
            fwd += li * per_tok
        for i in range(cfg.num_decoder_layers):
            per_tok = (
                2 * (attn_proj + 2 * d * da + _mlp_params_per_token(cfg, i))
                + 4 * lt * da / 2
                + 4 * li * da
            )
            fwd += lt * per_tok + li * 2 * (2 * d * da)  # cross K/V of the encoder output
    else:
        for i in range(cfg.num_decoder_layers):
            per_tok = 2 * (attn_proj + _mlp_params_per_token(cfg, i)) + 4 * lt * da / 2
            fwd += lt * per_tok
    fwd += lt * 2 * d * cfg.vocab_size  # output projection
    return {"forward": float(fwd), "train": float(3 * fwd)}


def flops_per_token(cfg: ModelConfig, lengths: Mapping[str, int]) -> dict[str, float]:
    """Model FLOPs per PROCESSED token: per example / (Li + Lt) (enc-dec) or / L."""
    li, lt = _check_lengths(cfg, lengths)
    ex = flops_per_example(cfg, lengths)
    n = li + lt if cfg.arch == "encoder_decoder" else lt
    return {k: v / n for k, v in ex.items()}


def _main() -> None:  # pragma: no cover - table printer for the README
    for n in names():
        c = get(n)
        p = count_params(c)
        print(
            f"{n:16s} {c.arch:16s} d={c.d_model:5d} ff={c.d_ff:6d} h={c.num_heads:3d} "
            f"L={c.stack_layers()} total={p['total'] / 1e6:9.2f}M "
            f"non_emb={p['non_embedding'] / 1e6:9.2f}M trainable={p['trainable'] / 1e6:9.2f}M"
        )


if __name__ == "__main__":  # pragma: no cover
    jax.config.update("jax_platforms", "cpu")
    _main()
