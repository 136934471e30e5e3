"""Compile time stays flat in depth with scan_layers (the one timed test, as requested)."""

import time

import jax
import jax.numpy as jnp
from flax import nnx

from repeat_scaling.models import build, forward, losses, sizes


def _compile_seconds(cfg) -> float:
    """Seconds to lower + compile one forward/backward step (abstract params: no init)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))))
    tok = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def loss(state, tok):
        logits, aux = forward(nnx.merge(graphdef, state), {"decoder_input_tokens": tok})
        total, _, w = losses.cross_entropy(logits, tok)
        return total / w

    start = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(state, tok).compile()
    return time.perf_counter() - start


def test_scanned_24_layers_compile_within_2x_of_2_layers():
    base = sizes.get("dec_tiny").replace(
        d_model=16, d_ff=32, num_heads=2, head_dim=8, vocab_size=128, remat_policy="full"
    )
    _compile_seconds(base.replace(num_decoder_layers=1))  # warm up tracing caches
    t24 = _compile_seconds(base.replace(num_decoder_layers=24))
    t2 = _compile_seconds(base.replace(num_decoder_layers=2))
    assert t24 < 2 * t2, (t2, t24)
