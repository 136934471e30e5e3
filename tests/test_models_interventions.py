"""Attention interventions (clamps): each kind's semantics, traced step windows under jit,
scan / unrolled / param-share / MoE-group agreement, a (2, 2, 2) mesh, parse errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repeat_scaling import sharding
from repeat_scaling.models import build, convert, forward, sizes
from repeat_scaling.models.interventions import Clamp, parse

ATTN2 = sizes.get("attn2_tiny").replace(d_model=32, head_dim=8)  # the ICL lab's model
DEC = sizes.get("dec_tiny").replace(d_model=32, d_ff=64, head_dim=8)
T5 = sizes.get("t5_tiny").replace(d_model=32, d_ff=64, head_dim=8)


@functools.cache
def _model(cfg, seed=0):
    return build(cfg, nnx.Rngs(seed))


def _like(cfg, model, **changes):
    """The same weights in another stack layout (scan / unrolled / attention impl)."""
    return convert.canonical_to_model(cfg.replace(**changes), convert.model_to_canonical(model))


@functools.partial(jax.jit, static_argnames=("graphdef", "clamps", "attn"))
def _fwd(graphdef, state, feats, step, clamps=(), attn=False):
    model = nnx.merge(graphdef, state)
    if attn:
        return model.apply(**feats, return_attention=True, interventions=clamps, step=step)[::2]
    return forward(model, feats, interventions=clamps, step=step)[0]


def run(model, feats, clamps=(), step=None, attn=False):
    g, s = nnx.split(model)
    return _fwd(g, s, feats, step, clamps=tuple(clamps), attn=attn)


def _packed_feats():
    """Two rows over a 5-token alphabet (repeats for induction), row 1 packed with two
    segments and 2 padding positions."""
    tok = np.random.RandomState(0).randint(2, 7, (2, 12)).astype(np.int32)
    seg = np.array([[1] * 12, [1] * 5 + [2] * 5 + [0] * 2], np.int32)
    tok[seg == 0] = 0
    pos = np.stack([np.arange(12), np.r_[np.arange(5), np.arange(5), 0, 0]]).astype(np.int32)
    return {
        "decoder_input_tokens": jnp.asarray(tok),
        "decoder_target_tokens": jnp.asarray(tok),
        "decoder_segment_ids": jnp.asarray(seg),
        "decoder_positions": jnp.asarray(pos),
    }


def _expected_patterns(tok, seg):
    """Hand-written loops: previous-token and induction one-hot targets per real query."""
    b, n = tok.shape
    prev, ind = np.zeros((b, n), int), np.zeros((b, n), int)
    for r in range(b):
        for q in range(n):
            same = [k for k in range(n) if seg[r, k] == seg[r, q] and seg[r, q] > 0]
            prev[r, q] = q - 1 if q - 1 in same else q
            earlier = [j for j in same if j < q and tok[r, j] == tok[r, q]]
            ind[r, q] = earlier[-1] + 1 if earlier else min(same, default=0)
    return prev, ind


# ----------------------------------------------------------------------------------------
def test_parse_accepts_dicts_and_names_bad_entries():
    ok = parse([dict(kind="ablate", layer=1, head=3), Clamp("copy", 0, 0, 5, 9)], ATTN2)
    assert ok == (Clamp("ablate", 1, 3), Clamp("copy", 0, 0, 5, 9))
    assert parse(None, ATTN2) == ()
    assert parse([dict(kind="induction", layer=1, head=0, stack="encoder")], T5)[0].stack == (
        "encoder"
    )
    bad = [
        (
            [{"kind": "ablate", "layer": 0, "head": 0}, {"kind": "ablate", "layer": 0, "head": 9}],
            r"interventions\[1\]\.head=9; expected a head in \[0, 4\)",
        ),
        ([{"kind": "zap", "layer": 0, "head": 0}], r"interventions\[0\]\.kind='zap'"),
        ([{"kind": "copy", "layer": 2, "head": 0}], r"\.layer=2; expected a layer in \[0, 2\)"),
        ([{"kind": "copy", "layer": 0, "head": 0, "stack": "encoder"}], r"\.stack='encoder'"),
        (
            [{"kind": "copy", "layer": 0, "head": 0, "start_step": 5, "end_step": 5}],
            r"\.end_step=5; expected -1 \(forever\) or a step > start_step=5",
        ),
        ([{"kind": "copy", "layer": 0, "head": 0, "when": 1}], r"unknown field\(s\) \['when'\]"),
        ([{"kind": "copy", "layer": 0}], r"interventions\[0\] lacks 'head'"),
        ([{"kind": "copy", "layer": "0", "head": 0}], r"\.layer='0'; expected an int"),
        ({"kind": "copy", "layer": 0, "head": 0}, "expected a list of clamp dicts"),
    ]
    for specs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            parse(specs, ATTN2)


def test_previous_token_and_induction_patterns_respect_segments():
    model = _model(ATTN2)
    feats = _packed_feats()
    clamps = parse(
        [dict(kind="previous_token", layer=0, head=1), dict(kind="induction", layer=1, head=2)],
        ATTN2,
    )
    _, free = run(model, feats, attn=True)
    logits, attn = run(model, feats, clamps, attn=True)
    tok, seg = np.asarray(feats["decoder_input_tokens"]), np.asarray(feats["decoder_segment_ids"])
    prev, ind = _expected_patterns(tok, seg)
    real = seg > 0
    eye = np.eye(tok.shape[1])
    np.testing.assert_array_equal(np.asarray(attn[0][:, 1])[real], eye[prev][real])
    np.testing.assert_array_equal(np.asarray(attn[1][:, 2])[real], eye[ind][real])
    assert ind[0].tolist() != list(range(12)) and (ind[0] > 0).any()  # real induction hits
    # Layer 0's other heads are untouched; the clamp changes the logits.
    for h in (0, 2, 3):
        np.testing.assert_allclose(attn[0][:, h], free[0][:, h], atol=1e-6)
    assert not np.allclose(logits, run(model, feats))


@pytest.mark.parametrize(
    "cfg,layer,name",
    [
        (DEC, 1, "decoder/layers_1/self_attention/out"),
        # MoE groups of 2: layer 1 is the 2nd layer of unit 0 (checks the index mapping).
        (
            DEC.replace(num_experts=2, capacity_factor=2.0, moe_every=2),
            1,
            "decoder/layers_0/layers/1/self_attention/out",
        ),
    ],
    ids=["dense", "moe_group"],
)
def test_ablate_equals_zeroing_the_heads_output_projection(cfg, layer, name):
    model = _model(cfg)
    feats = _packed_feats()
    canon = convert.model_to_canonical(model)
    assert name in canon
    canon[name] = canon[name].copy()
    canon[name][3] = 0.0  # head 3's rows of the output projection
    edited = convert.canonical_to_model(cfg, canon)
    clamped = run(model, feats, [Clamp("ablate", layer, 3)])
    np.testing.assert_allclose(clamped, run(edited, feats), atol=1e-5)
    assert not np.allclose(clamped, run(model, feats), atol=1e-3)


def test_copy_raises_the_attended_tokens_logit():
    cfg = ATTN2.replace(num_decoder_layers=1)
    model = _model(cfg)
    tok = jnp.asarray(np.random.RandomState(1).randint(2, 300, (2, 10)), jnp.int32)
    feats = {"decoder_input_tokens": tok}
    base, (w,) = run(model, feats, attn=True)
    copied = run(model, feats, [Clamp("copy", 0, 2)])
    t = np.asarray(tok)
    gain = np.take_along_axis(
        np.asarray(copied - base), np.broadcast_to(t[:, None, :], (2, 10, 10)), -1
    )
    # Position 0 attends only to itself: its own token's logit rises.
    assert (gain[:, 0, 0] > 0).all()
    # Everywhere, the attention-weighted logit of the attended tokens rises.
    weighted = np.sum(np.asarray(w[:, 2]) * gain, axis=-1)
    assert (weighted > 0).all(), weighted


def test_step_window_is_traced_under_one_compilation():
    model = _model(ATTN2)
    feats = {"decoder_input_tokens": _packed_feats()["decoder_input_tokens"]}
    clamps = (Clamp("previous_token", 0, 0, start_step=2, end_step=5),)
    g, s = nnx.split(model)
    f = jax.jit(lambda s, step: forward(nnx.merge(g, s), feats, interventions=clamps, step=step)[0])
    free, on = run(model, feats), run(model, feats, clamps)  # step=None: every clamp active
    assert not np.allclose(free, on)
    for step, want in ((0, free), (1, free), (2, on), (4, on), (5, free), (1000, free)):
        np.testing.assert_allclose(f(s, jnp.int32(step)), want, atol=1e-5)
    assert f._cache_size() == 1
    forever = (Clamp("ablate", 1, 1, start_step=3),)
    np.testing.assert_allclose(run(model, feats, forever, jnp.int32(2)), free, atol=1e-6)
    assert not np.allclose(run(model, feats, forever, jnp.int32(10**6)), free)


def test_scan_unrolled_param_share_and_encoder_clamps_agree():
    feats = _packed_feats()
    clamps = parse(
        [
            dict(kind="induction", layer=1, head=0),
            dict(kind="previous_token", layer=0, head=3),
            dict(kind="copy", layer=1, head=1),
            dict(kind="ablate", layer=0, head=2),
        ],
        DEC,
    )
    scanned = _model(DEC.replace(remat_policy="full"))
    want = run(scanned, feats, clamps)
    assert not np.allclose(want, run(scanned, feats), atol=1e-3)
    unrolled = _like(DEC, scanned, scan_layers=False, attention_impl="xla")
    np.testing.assert_allclose(run(unrolled, feats, clamps), want, atol=1e-5)
    shared = DEC.replace(param_share=True)
    a, b = _model(shared), _model(shared.replace(scan_layers=False))
    np.testing.assert_allclose(run(a, feats, clamps), run(b, feats, clamps), atol=1e-5)
    # Encoder-decoder: encoder and decoder self-attention clamps, scan vs unrolled.
    t5 = _model(T5)
    tok = feats["decoder_input_tokens"]
    ef = {"encoder_input_tokens": tok, "decoder_input_tokens": tok[:, :6]}
    ec = parse(
        [
            dict(kind="induction", layer=1, head=1, stack="encoder"),
            dict(kind="previous_token", layer=0, head=0),
        ],
        T5,
    )
    want = run(t5, ef, ec)
    assert not np.allclose(want, run(t5, ef), atol=1e-3)
    np.testing.assert_allclose(run(_like(T5, t5, scan_layers=False), ef, ec), want, atol=1e-5)


def test_clamped_forward_on_a_2x2x2_mesh():
    cfg = DEC
    feats = {k: jnp.concatenate([v] * 4) for k, v in _packed_feats().items()}  # batch 8
    clamps = parse(
        [dict(kind="induction", layer=1, head=0), dict(kind="copy", layer=0, head=1)], cfg
    )
    want = run(_model(cfg), feats, clamps, jnp.int32(3))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        abstract = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
        graphdef, abs_state = nnx.split(abstract)
        shardings = sharding.state_shardings(abs_state, mesh)
        state = jax.jit(lambda: nnx.split(build(cfg, nnx.Rngs(0)))[1], out_shardings=shardings)()
        f = jax.device_put(feats, sharding.batch_sharding(mesh))
        got = jax.jit(
            lambda s, f, step: forward(nnx.merge(graphdef, s), f, interventions=clamps, step=step)[
                0
            ]
        )(state, f, jnp.int32(3))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
