"""`ModelConfig`: the frozen, JSON-able description of one model.

Conventions:
* ``vocab_size`` is the *padded* embedding size (a multiple of 128, see
  :func:`padded_vocab_size`); tokenizer ids >= the real vocabulary are never produced.
* ``arch`` is "encoder_decoder" (T5 v1.1) or "decoder_only" (which uses
  ``num_decoder_layers`` and ignores ``num_encoder_layers``).
* ``position``: "relative" = T5 relative position bias (32 buckets, max distance 128,
  one table per stack); "rope" = rotary embeddings (decoder-only only). Decoder-only
  default is "rope": it leaves the attention free of a [H, L, L] bias (flash-attention
  friendly) and extrapolates in length; "relative" reproduces T5X's decoder-only model.
* Dropout rates are probabilities; the model multiplies them by a runtime
  ``dropout_scale`` (staged dropout). ``droppath_rate`` is the per-example probability of
  dropping each residual branch (stochastic depth, same rate in every layer).
* MoE: ``num_experts > 0`` makes every ``moe_every``-th layer (1-based: layers
  moe_every, 2*moe_every, ...) a top-``top_k`` mixture of experts.
* ``param_share``: all layers of a stack share one set of weights (ALBERT-style).
* ``scan_unroll``: layers per iteration of the scanned stack's loop (``lax.scan``
  ``unroll``); a value >= the layer count emits the stack as straight-line code. The
  parameters and the numbers are the same; only the compiled program differs (for 2-layer
  CPU models it saves the loop's stacked residual buffers, see the README's benchmarks).
* ``dtype`` is the compute dtype; parameters are stored in ``param_dtype`` (float32).
* ``attention_impl``: "einsum" (explicit einsums, float32 softmax; supports attention
  dropout and returning weights), "xla" / "cudnn" (``jax.nn.dot_product_attention``;
  "cudnn" is the fused flash kernel on NVIDIA GPUs, needs bf16 compute), "cpu_fused" (one
  XLA:CPU custom call per attention and its VJP, :mod:`repeat_scaling.models.cpu_attention`:
  CPU, float32, no position bias). Probes that ask for attention weights always use the
  einsum path.
* ``ops``: "tuned" (hand-written VJPs for XLA:CPU) or "plain" (autodiff) for the layers'
  einsums (:mod:`repeat_scaling.models.ops`). The parameters and the forward values are the
  same; gradients agree up to rounding.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

from repeat_scaling.data.features import ARCHS
from repeat_scaling.models.cpu_attention import HEAD_DIMS as CPU_HEAD_DIMS
from repeat_scaling.models.ops import IMPLS as OPS

POSITIONS = ("relative", "rope")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
#: The dtypes a model may compute in (``dtype``) or store its parameters in (``param_dtype``).
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "cpu_fused")

_JNP_DTYPES = {name: jnp.dtype(name) for name in DTYPES}


def dtype_of(name: str) -> jnp.dtype:
    """The jnp dtype of a name in :data:`DTYPES` (KeyError for any other)."""
    return _JNP_DTYPES[name]


def padded_vocab_size(n: int, multiple: int = 128) -> int:
    """Round a vocabulary size up to a multiple of ``multiple`` (embedding table rows)."""
    if n <= 0:
        raise ValueError(f"vocab size must be positive, got {n}")
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one model (see the module docstring for conventions)."""

    arch: str = "encoder_decoder"
    vocab_size: int = 32128
    d_model: int = 512
    d_ff: int = 1024
    num_heads: int = 6
    head_dim: int = 64
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    position: str = "relative"
    relative_buckets: int = 32
    relative_max_distance: int = 128
    rope_theta: float = 10000.0
    attention_only: bool = False
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    droppath_rate: float = 0.0
    num_experts: int = 0
    top_k: int = 1
    capacity_factor: float = 1.25
    moe_every: int = 1
    aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    param_share: bool = False
    scan_layers: bool = True
    scan_unroll: int = 1
    remat_policy: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    float32_logits: bool = True
    attention_impl: str = "einsum"
    ops: str = "tuned"
    name: str = "custom"

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError with a one-line message on the first bad field."""

        def bad(field: str, expected: str) -> None:
            raise ValueError(
                f"model config {self.name!r}: {field}={getattr(self, field)!r}; expected {expected}"
            )

        if self.arch not in ARCHS:
            bad("arch", f"one of {ARCHS}")
        if self.position not in POSITIONS:
            bad("position", f"one of {POSITIONS}")
        if self.arch == "encoder_decoder" and self.position != "relative":
            bad("position", "'relative' for encoder_decoder (T5 v1.1)")
        if self.position == "rope" and self.head_dim % 2:
            bad("head_dim", "an even number for rope")
        for f in ("vocab_size", "d_model", "num_heads", "head_dim", "num_decoder_layers"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                bad(f, "a positive int")
        if self.vocab_size % 128:
            bad("vocab_size", "a multiple of 128 (use padded_vocab_size)")
        if self.arch == "encoder_decoder" and self.num_encoder_layers <= 0:
            bad("num_encoder_layers", "a positive int for encoder_decoder")
        if not self.attention_only and self.d_ff <= 0:
            bad("d_ff", "a positive int (or attention_only=True)")
        for f in ("dropout_rate", "attention_dropout_rate", "droppath_rate"):
            if not 0.0 <= getattr(self, f) < 1.0:
                bad(f, "a probability in [0, 1)")
        if self.num_experts < 0:
            bad("num_experts", "0 (dense) or the number of experts")
        if self.num_experts:
            if self.attention_only:
                bad("num_experts", "0 for attention_only models")
            if not 1 <= self.top_k <= self.num_experts:
                bad("top_k", f"in [1, num_experts={self.num_experts}]")
            if self.capacity_factor <= 0:
                bad("capacity_factor", "> 0")
            if self.moe_every < 1:
                bad("moe_every", ">= 1")
            for n in self.stack_layers():
                if self.scan_layers and n % self.moe_every:
                    bad("moe_every", f"a divisor of the layer count {n} when scan_layers=True")
        if self.attention_impl not in ATTENTION_IMPLS:
            bad("attention_impl", f"one of {ATTENTION_IMPLS}")
        if self.attention_impl != "einsum" and self.attention_dropout_rate:
            bad("attention_impl", "'einsum' when attention_dropout_rate > 0")
        if self.attention_impl == "cpu_fused":
            if self.position != "rope":
                bad("attention_impl", "'einsum' or 'xla' with relative position bias")
            if self.dtype != "float32":
                bad("attention_impl", "'einsum' or 'xla' when dtype is not float32")
            if self.head_dim not in CPU_HEAD_DIMS:
                bad("attention_impl", f"'einsum' or 'xla' unless head_dim is in {CPU_HEAD_DIMS}")
        if self.ops not in OPS:
            bad("ops", f"one of {OPS}")
        if not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
            bad("scan_unroll", "an int >= 1 (layers per loop iteration)")
        if self.remat_policy not in REMAT_POLICIES:
            bad("remat_policy", f"one of {REMAT_POLICIES}")
        if self.dtype not in DTYPES:
            bad("dtype", f"one of {DTYPES}")
        if self.param_dtype not in DTYPES:
            bad("param_dtype", f"one of {DTYPES}")
        if self.relative_buckets < 4 or self.relative_max_distance < 2:
            bad("relative_buckets", ">= 4 buckets and max distance >= 2")

    # -- helpers ----------------------------------------------------------------------
    @property
    def compute_dtype(self) -> jnp.dtype:
        """``dtype`` as a jnp dtype."""
        return dtype_of(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        """``param_dtype`` as a jnp dtype."""
        return dtype_of(self.param_dtype)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def stack_layers(self) -> tuple[int, ...]:
        """Layer count of each stack (encoder, decoder) or (decoder,)."""
        if self.arch == "encoder_decoder":
            return (self.num_encoder_layers, self.num_decoder_layers)
        return (self.num_decoder_layers,)

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i (0-based) of a stack is a mixture-of-experts layer."""
        return self.is_moe and (i + 1) % self.moe_every == 0

    def replace(self, **kw: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (used in config.json and checkpoint compatibility checks)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
