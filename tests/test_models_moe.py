"""Mixture of experts: routing capacity, auxiliary losses by hand, training benefit."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from repeat_scaling.models import build, forward, losses, moe, sizes


def _logits_from_probs(p):
    return jnp.log(jnp.asarray(p, jnp.float32))


def test_capacity_drops_overflow_tokens_in_order():
    # Four tokens all prefer expert 0; capacity = ceil(1.0 * 1 * 4 / 2) = 2.
    logits = _logits_from_probs([[[0.9, 0.1]] * 4])
    cap = moe.expert_capacity(4, 2, 1, 1.0)
    assert cap == 2
    dispatch, combine, _, _ = moe.route(logits, 1, cap)
    assert dispatch.shape == (1, 4, 2, 2)
    np.testing.assert_array_equal(dispatch[0, :, 0, :], [[1, 0], [0, 1], [0, 0], [0, 0]])
    assert float(dispatch[..., 1, :].sum()) == 0.0
    assert float(dispatch.sum(axis=(1,)).max()) <= 1.0  # one token per slot
    np.testing.assert_allclose(combine[0, :2, 0].sum(-1), [0.9, 0.9], rtol=1e-6)
    np.testing.assert_allclose(combine[0, 2:].sum(), 0.0)


def test_top2_priority_and_gate_normalisation():
    # First choices: e0, e1, e0, e0; second choices: e1, e0, e1, e1. Capacity 2.
    p = [[[0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.9, 0.1]]]
    dispatch, combine, _, _ = moe.route(_logits_from_probs(p), 2, 2)
    per_expert = np.asarray(dispatch.sum(axis=(1, 3)))[0]
    assert list(per_expert) == [2, 2]  # capacity respected
    # e0 slots: token0 (1st), token2 (1st); token3's first choice overflows.
    np.testing.assert_array_equal(dispatch[0, :, 0, :], [[1, 0], [0, 0], [0, 1], [0, 0]])
    # e1 slots: token1 (1st choice) then token0 (2nd choice, before token2/token3).
    np.testing.assert_array_equal(dispatch[0, :, 1, :], [[0, 1], [1, 0], [0, 0], [0, 0]])
    np.testing.assert_allclose(combine[0, 0].sum(), 1.0, rtol=1e-6)  # 0.7 + 0.3 renormalised
    np.testing.assert_allclose(combine[0, 1].sum(), 0.8, rtol=1e-6)  # 2nd choice dropped


def test_aux_losses_match_hand_computation():
    p = jnp.asarray([[[0.75, 0.25], [0.6, 0.4]]], jnp.float32)
    _, _, probs, first = moe.route(jnp.log(p), 1, 2)
    # f = [1, 0] (both first choices e0), P = [0.675, 0.325] -> 2 * 0.675.
    assert float(moe.load_balance_loss(probs, first)) == pytest.approx(1.35, rel=1e-6)
    balanced = jnp.asarray([[[0.5, 0.5], [0.5, 0.5]]])
    assert float(moe.load_balance_loss(balanced, jnp.asarray([[[1.0, 0], [0, 1.0]]]))) == 1.0
    logits = jnp.log(p) + jnp.asarray([[[2.0], [3.0]]])  # logsumexp = 2 and 3
    assert float(moe.router_z_loss(logits)) == pytest.approx((4 + 9) / 2, rel=1e-5)


def test_forward_reports_scaled_aux_losses():
    cfg = sizes.get("dec_tiny_moe").replace(aux_loss_coef=0.5, router_z_loss_coef=0.25)
    model = build(cfg, nnx.Rngs(0))
    tok = jnp.asarray(np.random.RandomState(0).randint(2, 300, (2, 8)), jnp.int32)
    _, aux = nnx.jit(lambda m, t: forward(m, {"decoder_input_tokens": t}))(model, tok)
    assert set(aux) == {"moe_aux_loss", "router_z_loss"}
    assert 0.5 * 1.0 <= float(aux["moe_aux_loss"]) <= 0.5 * cfg.num_experts
    assert float(aux["router_z_loss"]) > 0


def _train(cfg, lut, steps=80):
    model = build(cfg, nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x):
        feats = dict(decoder_input_tokens=x, decoder_target_tokens=jnp.take(lut, x))

        def loss_fn(m):
            logits, aux = forward(m, feats)
            loss, _, w = losses.cross_entropy(logits, feats["decoder_target_tokens"])
            return loss / w + sum(aux.values()), loss / w

        (_, ce), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return ce

    ces = [
        float(
            step(
                model,
                opt,
                jnp.asarray(np.random.RandomState(i).randint(2, 512, (32, 16)), jnp.int32),
            )
        )
        for i in range(steps)
    ]
    return float(np.mean(ces[-20:]))


def test_moe_trains_to_lower_loss_than_dense_base():
    """Toy task: map each token through a fixed random permutation (a lookup table that a
    d_model=16 model cannot hold in its embeddings; expert capacity helps)."""
    dense = sizes.get("dec_tiny").replace(
        vocab_size=512, d_model=16, d_ff=16, num_heads=2, head_dim=8, num_decoder_layers=1
    )
    sparse = dense.replace(num_experts=8, top_k=1, moe_every=1, capacity_factor=2.0)
    lut = np.zeros(512, np.int32)
    lut[2:] = np.random.RandomState(0).permutation(np.arange(2, 512))
    lut = jnp.asarray(lut)
    d, s = _train(dense, lut), _train(sparse, lut)
    assert s < d, (s, d)
