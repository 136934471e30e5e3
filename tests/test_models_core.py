"""Models: config, sizes/params/FLOPs, masks and packing, dropout, attention weights."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repeat_scaling.models import build, convert, forward, ops, sizes
from repeat_scaling.models.config import ModelConfig, padded_vocab_size
from repeat_scaling.models.layers import relative_position_bucket
from repeat_scaling.models.ops import (
    add_bias,
    attention_context,
    attention_scores,
    dense,
    project_logits,
)

TINY_DEC = sizes.get("dec_tiny").replace(d_model=32, d_ff=64, head_dim=8)
TINY_T5 = sizes.get("t5_tiny").replace(d_model=32, d_ff=64, head_dim=8)


def _tokens(shape, seed=0, low=2, high=300):
    return jnp.asarray(np.random.RandomState(seed).randint(low, high, shape), jnp.int32)


@functools.cache
def _model(cfg, seed=0):
    """Models are cached: tests share them (building compiles one init per shape)."""
    return build(cfg, nnx.Rngs(seed))


_fwd = nnx.jit(lambda m, f: forward(m, f)[0])


@nnx.jit
def _call(m, *args):
    return m(*args)


@nnx.jit(static_argnames=("return_attention",))
def _call_kw(m, *args, return_attention=False, **kw):
    return m(*args, return_attention=return_attention, **kw)


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------
def test_config_roundtrip_and_validation():
    cfg = sizes.get("t5_small")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(dropout_rate=0.1).dropout_rate == 0.1
    assert padded_vocab_size(359) == 384 and padded_vocab_size(32128) == 32128
    with pytest.raises(ValueError, match="arch='bogus'"):
        cfg.replace(arch="bogus")
    with pytest.raises(ValueError, match="vocab_size=359"):
        cfg.replace(vocab_size=359)
    with pytest.raises(ValueError, match="position='rope'"):
        cfg.replace(position="rope")  # T5 encoder-decoder is relative-only
    with pytest.raises(ValueError, match="top_k=3"):
        cfg.replace(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        cfg.replace(nope=1)
    with pytest.raises(ValueError, match="unknown model size 't5_huge'"):
        sizes.get("t5_huge")


# ----------------------------------------------------------------------------------------
# Sizes: parameter table and FLOPs
# ----------------------------------------------------------------------------------------
def test_t5_parameter_table_matches_reference():
    got = {
        n: sizes.count_params(sizes.get(n))["total"]
        for n in ("t5_small", "t5_base", "t5_large", "t5_xl", "t5_xxl")
    }
    assert round(got["t5_small"] / 1e6, 1) == 77.0
    assert round(got["t5_base"] / 1e6, 1) == 247.6
    assert round(got["t5_large"] / 1e6, 1) == 783.2
    assert round(got["t5_xl"] / 1e9, 2) == 2.85
    assert round(got["t5_xxl"] / 1e9, 1) == 11.1


def test_count_params_by_hand_and_paramshare():
    d, f, da, v = 32, 64, 32, 384
    dec = sizes.count_params(TINY_DEC)
    layer = 4 * d * da + 3 * d * f + 2 * d
    assert dec["total"] == dec["trainable"] == 2 * v * d + 2 * layer + d
    assert dec["non_embedding"] == 2 * layer + d
    moe = sizes.count_params(TINY_DEC.replace(num_experts=4, moe_every=2))
    assert moe["total"] == dec["total"] + 3 * 3 * d * f + d * 4  # 3 more experts + router
    t5 = sizes.count_params(TINY_T5)
    enc, dl = 4 * d * da + 3 * d * f + 2 * d, 8 * d * da + 3 * d * f + 3 * d
    assert t5["total"] == 2 * v * d + 2 * enc + 2 * dl + 2 * d + 2 * 4 * 32
    shared = sizes.count_params(TINY_DEC.replace(num_decoder_layers=6, param_share=True))
    plain = sizes.count_params(TINY_DEC.replace(num_decoder_layers=6))
    assert shared["total"] == plain["total"]
    assert shared["trainable"] == plain["trainable"] - 5 * layer
    # The decoder-only family spans ~1M..~1B non-embedding parameters.
    assert sizes.count_params(sizes.get("d1m"))["non_embedding"] < 2e6
    assert 0.9e9 < sizes.count_params(sizes.get("d1b"))["non_embedding"] < 1.2e9


def test_flops_formula_by_hand():
    cfg = TINY_DEC.replace(vocab_size=128)
    d, f, da, n, v, lt = 32, 64, 4 * 8, 2, 128, 10
    per_tok = n * (2 * (4 * d * da + 3 * d * f) + 4 * lt * da / 2) + 2 * d * v
    got = sizes.flops_per_token(cfg, {"decoder": lt})
    assert got["forward"] == pytest.approx(per_tok)
    assert got["train"] == pytest.approx(3 * per_tok)
    moe = cfg.replace(num_experts=8, top_k=1, moe_every=2)
    assert sizes.flops_per_token(moe, {"decoder": lt})["forward"] == pytest.approx(
        per_tok + 2 * d * 8
    )  # router; one expert per token = dense FLOPs
    t5 = TINY_T5.replace(vocab_size=128, num_encoder_layers=1, num_decoder_layers=1)
    li, lt = 12, 6
    enc = li * (2 * (4 * d * da + 3 * d * f) + 4 * li * da)
    dec = lt * (2 * (6 * d * da + 3 * d * f) + 2 * lt * da + 4 * li * da) + li * 4 * d * da
    ex = enc + dec + lt * 2 * d * v
    assert sizes.flops_per_example(t5, {"encoder": li, "decoder": lt})["forward"] == ex
    assert sizes.flops_per_token(t5, {"encoder": li, "decoder": lt})["forward"] == ex / (li + lt)
    with pytest.raises(ValueError, match="'encoder'"):
        sizes.flops_per_token(t5, {"decoder": 4})


def test_relative_position_buckets_t5():
    rel = np.arange(-200, 201)[None, :]
    b = relative_position_bucket(rel, bidirectional=True)[0]
    assert b[200] == 0 and b[201] == 17 and b[199] == 1  # key after query -> upper half
    assert b.max() == 31 and b.min() == 0
    c = relative_position_bucket(rel, bidirectional=False)[0]
    assert (c[201:] == 0).all() and c[:200].max() == 31 and c[199] == 1
    # Exact buckets for |distance| < 8 (bidirectional) / < 16 (causal).
    assert list(c[200 - np.arange(16)]) == list(range(16))


@pytest.mark.parametrize(
    "bias_shape,dtype",
    [((1, 3, 5, 7), jnp.float32), ((2, 3, 5, 7), jnp.float32), ((1, 3, 5, 7), jnp.bfloat16)],
)
def test_add_bias_gradients_match_plain_addition(bias_shape, dtype):
    """The hand-written VJP (batch sum as a dot) equals autodiff of ``logits + bias``."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    logits = jax.random.normal(k1, (2, 3, 5, 7), jnp.float32)
    bias = jax.random.normal(k2, bias_shape, dtype)
    w = jax.random.normal(k3, (2, 3, 5, 7), jnp.float32)

    def loss(f):
        return lambda x, b: jnp.sum(jnp.tanh(f(x, b)) * w)

    got = jax.jit(jax.grad(loss(add_bias), argnums=(0, 1)))(logits, bias)
    want = jax.grad(loss(lambda x, b: x + b), argnums=(0, 1))(logits, bias)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and g.shape == r.shape
        np.testing.assert_allclose(
            np.asarray(g, np.float32),
            np.asarray(r, np.float32),
            rtol=1e-2 if dtype != jnp.float32 else 1e-6,
            atol=1e-6,
        )


# (function, the einsum it computes, operand shapes, float32 output)
_HAND_WRITTEN_VJPS = {
    "project_logits": (project_logits, "bld,dv->blv", (2, 5, 8), (8, 384), True),
    "dense_widening": (dense, "bld,df->blf", (2, 5, 8), (8, 24), False),
    "dense_narrowing": (dense, "blf,fd->bld", (2, 5, 24), (24, 8), False),
    "attention_scores": (attention_scores, "bqhd,bkhd->bhqk", (2, 5, 3, 4), (2, 7, 3, 4), True),
    "attention_context": (attention_context, "bhqk,bkhd->bqhd", (2, 3, 5, 7), (2, 7, 3, 4), False),
}


@pytest.mark.parametrize("name", sorted(_HAND_WRITTEN_VJPS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("pinned", [True, False], ids=["cpu", "accelerator"])
def test_hand_written_vjps_match_einsum(name, dtype, pinned, monkeypatch):
    """Each einsum with a hand-written VJP (transposes chosen for XLA:CPU's library
    dot) has the value and gradients of autodiff through the plain einsum, with the
    transposes pinned by a barrier (CPU) and without (what GPU/TPU compile)."""
    if not pinned:
        monkeypatch.setattr(ops, "_pinned_on_cpu", lambda x: x)
    fn, spec, x_shape, k_shape, f32_out = _HAND_WRITTEN_VJPS[name]
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k1, x_shape, jnp.float32).astype(dtype)
    kernel = jax.random.normal(k2, k_shape, jnp.float32).astype(dtype)

    def plain(x, k):
        return jnp.einsum(spec, x, k, preferred_element_type=jnp.float32 if f32_out else None)

    out = plain(x, kernel)
    w = jax.random.normal(k3, out.shape, jnp.float32)

    def loss(f):
        return lambda x, k: jnp.sum(jax.nn.log_softmax(f(x, k).astype(jnp.float32)) * w)

    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    got_out = jax.jit(fn)(x, kernel)
    assert got_out.dtype == out.dtype == (jnp.float32 if f32_out else dtype)
    np.testing.assert_allclose(
        np.asarray(got_out, np.float32), np.asarray(out, np.float32), rtol=tol, atol=tol
    )
    got = jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(x, kernel)
    want = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(x, kernel)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype == dtype and g.shape == r.shape
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol
        )


# (operand shapes of each op of ops.Ops; dense is wider in than out, project_logits and
# project_heads the other way round: the two orders of the kernel gradient's matmul)
_OPS_SHAPES = {
    "dense": ((2, 5, 24), (24, 8)),
    "project_heads": ((2, 5, 8), (8, 3, 4)),
    "merge_heads": ((2, 5, 3, 4), (3, 4, 8)),
    "project_logits": ((2, 5, 8), (8, 384)),
    "attention_scores": ((2, 5, 3, 4), (2, 7, 3, 4)),
    "attention_context": ((2, 3, 5, 7), (2, 7, 3, 4)),
    "add_bias": ((2, 3, 5, 7), (1, 3, 5, 7)),
}


@pytest.mark.parametrize("name", sorted(_OPS_SHAPES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ops_tuned_and_plain_agree(name, dtype):
    """``ops="tuned"`` and ``ops="plain"``: the same values, gradients equal up to rounding."""
    assert sorted(f.name for f in dataclasses.fields(ops.Ops)) == sorted(_OPS_SHAPES)
    tuned, plain = getattr(ops.TUNED, name), getattr(ops.PLAIN, name)
    x_shape, y_shape = _OPS_SHAPES[name]
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(k1, x_shape, jnp.float32).astype(dtype)
    y = jax.random.normal(k2, y_shape, jnp.float32).astype(dtype)
    want = jax.jit(plain)(x, y)
    got = jax.jit(tuned)(x, y)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    w = jax.random.normal(k3, want.shape, jnp.float32)

    def loss(f):
        return lambda x, y: jnp.sum(jax.nn.log_softmax(f(x, y).astype(jnp.float32)) * w)

    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    got = jax.jit(jax.grad(loss(tuned), argnums=(0, 1)))(x, y)
    want = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(x, y)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype == dtype and g.shape == r.shape
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        # bfloat16: the VJPs round at other points, so compare at the gradient's scale
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * max(1.0, np.abs(r).max()))


@pytest.mark.parametrize("cfg", [TINY_T5, TINY_DEC], ids=["t5", "dec"])
def test_model_ops_switch_keeps_parameters_and_numbers(cfg):
    """A model built with ``ops="plain"`` has the parameters of the default ("tuned") one,
    the same logits, and its loss gradients agree to rounding."""
    assert ModelConfig().ops == "tuned"
    with pytest.raises(ValueError, match=r"ops='fast'; expected one of \('tuned', 'plain'\)"):
        cfg.replace(ops="fast")
    graphdef_t, state_t = nnx.split(_model(cfg))
    graphdef_p, state_p = nnx.split(_model(cfg.replace(ops="plain")))
    jax.tree.map(np.testing.assert_array_equal, state_t, state_p)
    tok = _tokens((2, 7))
    feats = {"decoder_input_tokens": tok[:, :6], "decoder_target_tokens": tok[:, 1:]}
    if cfg.arch == "encoder_decoder":
        feats["encoder_input_tokens"] = tok

    def loss(state, graphdef):
        logits = forward(nnx.merge(graphdef, state), feats)[0]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, feats["decoder_target_tokens"][..., None], -1))

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (lt, gt), (lp, gp) = value_and_grad(state_t, graphdef_t), value_and_grad(state_p, graphdef_p)
    np.testing.assert_array_equal(
        _fwd(_model(cfg), feats), _fwd(nnx.merge(graphdef_p, state_p), feats)
    )
    np.testing.assert_allclose(lt, lp, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), gt, gp)


# ----------------------------------------------------------------------------------------
# Masks, packing, positions
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["rope", "relative"])
def test_decoder_only_packing_and_causality(position):
    model = _model(TINY_DEC.replace(position=position), 1)
    tok = _tokens((1, 12))
    seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    pos = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)
    feats = dict(
        decoder_input_tokens=tok,
        decoder_target_tokens=tok,
        decoder_segment_ids=seg,
        decoder_positions=pos,
    )
    base = _fwd(model, feats)
    # Perturbing segment 2 leaves segment 1 unchanged, and vice versa.
    out = _fwd(model, dict(feats, decoder_input_tokens=tok.at[0, 8].set(7)))
    np.testing.assert_array_equal(out[0, :5], base[0, :5])
    np.testing.assert_array_equal(out[0, 5:8], base[0, 5:8])  # causal: before position 8
    assert not np.allclose(out[0, 8:], base[0, 8:])
    out1 = _fwd(model, dict(feats, decoder_input_tokens=tok.at[0, 1].set(7)))
    np.testing.assert_array_equal(out1[0, 5:], base[0, 5:])
    # A packed segment equals the same sequence run alone (positions restart at 0).
    alone = _fwd(model, dict(decoder_input_tokens=tok[:, 5:], decoder_target_tokens=tok[:, 5:]))
    np.testing.assert_allclose(alone[0], base[0, 5:], atol=1e-5)


def test_prefix_lm_mask_is_bidirectional_over_prefix():
    model = _model(TINY_DEC, 1)
    tok = _tokens((2, 12))
    tok = tok.at[1].set(tok[1].at[3].set(5))  # row 1 = row 0 with position 3 changed
    tok = tok.at[1].set(tok[0].at[3].set(5))
    prefix = jnp.asarray([[1, 1, 1, 1] + [0] * 8] * 2, jnp.int32)
    out = _fwd(
        model,
        dict(decoder_input_tokens=tok, decoder_target_tokens=tok, decoder_causal_attention=prefix),
    )
    assert not np.allclose(out[0, 0], out[1, 0])  # earlier prefix token sees position 3
    causal = _fwd(model, dict(decoder_input_tokens=tok, decoder_target_tokens=tok))
    np.testing.assert_array_equal(causal[0, :3], causal[1, :3])


def test_encoder_decoder_masks_padding_and_segments():
    model = _model(TINY_T5, 3)
    enc = _tokens((2, 10))
    tgt = _tokens((2, 6), seed=1)
    dec = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), tgt[:, :-1]], axis=1)
    base = _call(model, enc, dec, tgt)
    assert base.shape == (2, 6, TINY_T5.vocab_size) and base.dtype == jnp.float32
    # Extra encoder padding changes nothing.
    padded = jnp.concatenate([enc, jnp.zeros((2, 5), jnp.int32)], axis=1)
    np.testing.assert_allclose(_call(model, padded, dec, tgt), base, atol=1e-5)
    # Packed: encoder segments [1]*4+[2]*6, decoder segments [1]*3+[2]*3.
    es = jnp.asarray([[1] * 4 + [2] * 6] * 2, jnp.int32)
    ds = jnp.asarray([[1] * 3 + [2] * 3] * 2, jnp.int32)
    feats = dict(
        encoder_input_tokens=enc,
        decoder_input_tokens=dec,
        decoder_target_tokens=tgt,
        encoder_segment_ids=es,
        decoder_segment_ids=ds,
    )
    p0 = _fwd(model, feats)
    p1 = _fwd(
        model,
        dict(
            feats,
            encoder_input_tokens=enc.at[:, 7].set(9),
            decoder_input_tokens=dec.at[:, 4].set(9),
        ),
    )
    np.testing.assert_array_equal(p1[:, :3], p0[:, :3])
    assert not np.allclose(p1[:, 3:], p0[:, 3:])


def test_return_attention_and_attention_only():
    cfg = TINY_DEC.replace(attention_only=True, d_ff=0)
    model = _model(cfg)
    tok = _tokens((2, 7))
    logits, attn = _call_kw(model, tok, return_attention=True)
    np.testing.assert_allclose(logits, _call(model, tok), atol=1e-6)
    assert len(attn) == 2 and attn[0].shape == (2, cfg.num_heads, 7, 7)
    np.testing.assert_allclose(attn[1].sum(-1), 1.0, atol=1e-5)
    assert float(jnp.triu(attn[0], k=1).max()) < 1e-6
    assert "mlp" not in nnx.state(model)["decoder"]["layers"]["layers"]
    t5 = _model(TINY_T5, 3)
    _, a = _call_kw(t5, tok, tok[:, :5], return_attention=True)
    assert [len(a[k]) for k in ("encoder", "decoder_self", "decoder_cross")] == [2, 2, 2]
    assert a["decoder_cross"][0].shape == (2, TINY_T5.num_heads, 5, 7)


def test_scan_unrolled_remat_and_param_share_agree():
    """Same weights, same logits: scanned / unrolled / remat / fused attention."""
    moe = TINY_DEC.replace(num_decoder_layers=4, num_experts=4, top_k=2, moe_every=2)
    tok = _tokens((2, 8))
    for cfg, other in (
        (TINY_DEC, dict(scan_layers=False, remat_policy="dots", attention_impl="xla")),
        (moe, dict(scan_layers=False)),
    ):
        scanned = _model(cfg, 1)
        canon = convert.model_to_canonical(scanned)
        unrolled = convert.canonical_to_model(cfg.replace(**other), canon)
        np.testing.assert_allclose(_call(unrolled, tok), _call(scanned, tok), atol=1e-5)
    shared = TINY_DEC.replace(num_decoder_layers=3, param_share=True)
    a = _model(shared)
    b = _model(shared.replace(scan_layers=False, remat_policy="full"))
    np.testing.assert_allclose(_call(a, tok), _call(b, tok), atol=1e-5)


def test_scan_unroll_emits_the_stack_without_a_loop():
    """``scan_unroll`` >= the layer count: the same stacked weights, no while loop."""
    tok = _tokens((2, 8))
    scanned = _model(TINY_DEC, 1)
    flat = convert.canonical_to_model(
        TINY_DEC.replace(scan_unroll=2), convert.model_to_canonical(scanned)
    )
    np.testing.assert_allclose(_call(flat, tok), _call(scanned, tok), atol=1e-6)
    for m, loops in ((scanned, True), (flat, False)):
        graphdef, state = nnx.split(m)
        hlo = jax.jit(lambda s, t, g=graphdef: nnx.merge(g, s)(t)).lower(state, tok).as_text()
        assert ("stablehlo.while" in hlo) == loops
    with pytest.raises(ValueError, match=r"scan_unroll=0; expected an int >= 1"):
        TINY_DEC.replace(scan_unroll=0)


def test_dropout_staging_and_determinism():
    cfg = TINY_DEC.replace(dropout_rate=0.3, attention_dropout_rate=0.1, droppath_rate=0.1)
    model = _model(cfg)
    tgt = _tokens((2, 6), seed=3)
    feats = dict(decoder_input_tokens=tgt, decoder_target_tokens=tgt)
    step = nnx.jit(
        lambda m, f, key, scale: forward(
            m, f, deterministic=False, dropout_rng=key, dropout_scale=scale
        )[0]
    )
    k0, k1 = jax.random.key(0), jax.random.key(1)
    det = _fwd(model, feats)
    np.testing.assert_allclose(step(model, feats, k0, 0.0), det, atol=1e-5)  # staged: off
    on0, on0b, on1 = (step(model, feats, k, 1.0) for k in (k0, k0, k1))
    np.testing.assert_array_equal(on0, on0b)
    assert not np.allclose(on0, det) and not np.allclose(on0, on1)
    with pytest.raises(ValueError, match="dropout_rng"):
        forward(model, feats, deterministic=False)
    with pytest.raises(ValueError, match="encoder_input_tokens"):
        forward(_model(TINY_T5, 3), dict(decoder_input_tokens=tgt))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = _model(TINY_DEC.replace(dtype="bfloat16"))
    tok = _tokens((2, 8))
    out = _call(model, tok)
    assert out.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert float(jnp.abs(out - _call(_model(TINY_DEC), tok)).max()) < 0.2
