"""``attention_impl="cpu_fused"``: the XLA:CPU custom call against the einsum path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repeat_scaling.models import build, convert, cpu_attention, forward, sizes
from repeat_scaling.models.layers import NEG_INF, rope_tables, rotate


def _reference(q, k, v, mask, rope=None):
    if rope is not None:
        q, k = rotate(q, *rope[0]), rotate(k, *rope[1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    weights = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _masks(B, L, H, seed):
    """Causal + packed segments + padding, with some rows masked entirely."""
    rng = np.random.default_rng(seed)
    causal = np.tril(np.ones((L, L), bool))
    seg = np.sort(rng.integers(0, 3, (B, L)), axis=-1)
    seg[:, -3:] = 0  # padding
    valid = seg > 0
    packed = causal & (seg[:, :, None] == seg[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    per_head = np.broadcast_to(packed[:, None], (B, H, L, L)).copy()
    per_head[:, 1, :, : L // 3] = False  # head 1 does not see the first keys
    holes = packed[:, None].copy()
    holes[..., 1::5] = False  # every head: every fifth key hidden
    return [causal[None, None], packed[:, None], per_head, holes]


@pytest.mark.parametrize("D,L", [(16, 128), (8, 37)])
def test_values_and_gradients_match_the_einsum_path(D, L):
    """Head sizes in both vector widths (16: 16 lanes, 8: 8 lanes; 32, two vectors a row,
    in the model test below); lengths on and off the kernel's 16-key chunks and 4-row
    blocks; causal, packed (segments + padding: fully masked rows), per-head masks and
    masks shared by the heads with holes among the keys; q and k rotated in the kernel
    (per-example positions, as packing gives) and not rotated."""
    B, H = 3, 4
    keys = jax.random.split(jax.random.key(D), 4)
    q, k, v, g = (jax.random.normal(kk, (B, L, H, D)) for kk in keys)
    positions = np.random.default_rng(D).integers(0, 2 * L, (B, L))
    tables = rope_tables(jnp.asarray(positions), D, 10000.0)
    for n, mask in enumerate(_masks(B, L, H, seed=D)):
        mask = jnp.asarray(mask)
        rope = None if n == 1 else (tables, tables)
        assert not bool(mask.any(-1).all()) or mask.shape[0] == 1  # packed: empty rows
        ref = _reference(q, k, v, mask, rope)
        got = cpu_attention.fused_attention(q, k, v, mask, rope)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)
        grads = [
            jax.grad(lambda q, k, v, f=f, m=mask, r=rope: (f(q, k, v, m, r) * g).sum(), (0, 1, 2))(
                q, k, v
            )
            for f in (_reference, cpu_attention.fused_attention)
        ]
        for want, have in zip(*grads):
            np.testing.assert_allclose(have, want, rtol=1e-4, atol=2e-5)


def test_decoder_model_trains_the_same_on_eight_devices():
    """The decoder-only model with cpu_fused attention: the einsum path's logits and
    parameter gradients (same weights), under jit with the batch sharded over 8 devices."""
    cfg = sizes.get("dec_tiny").replace(d_model=32, d_ff=64, head_dim=32, vocab_size=384)
    einsum_model = build(cfg, nnx.Rngs(0))
    fused_model = convert.canonical_to_model(
        cfg.replace(attention_impl="cpu_fused"), convert.model_to_canonical(einsum_model)
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 300, (8, 24)).astype(np.int32)
    segments = np.repeat(np.array([[1] * 10 + [2] * 11 + [0] * 3]), 8, 0).astype(np.int32)
    tokens[segments == 0] = 0
    positions = np.concatenate([np.arange(10), np.arange(11), np.zeros(3, int)])
    feats = dict(
        decoder_input_tokens=tokens,
        decoder_target_tokens=tokens,
        decoder_segment_ids=segments,
        decoder_positions=np.repeat(positions[None], 8, 0).astype(np.int32),
    )
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ("data",)), jax.sharding.PartitionSpec("data")
    )
    feats = {n: jax.device_put(jnp.asarray(x), sharding) for n, x in feats.items()}

    @nnx.jit
    def loss_and_grads(model, feats):
        def loss(m):
            logits = forward(m, feats)[0]
            return (jax.nn.log_softmax(logits).max(-1) * (feats["decoder_target_tokens"] > 0)).sum()

        return nnx.value_and_grad(loss)(model)

    (want, want_g), (have, have_g) = (loss_and_grads(m, feats) for m in (einsum_model, fused_model))
    np.testing.assert_allclose(have, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(have_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_settings_it_does_not_take_are_refused():
    dec = sizes.get("dec_tiny")
    with pytest.raises(
        ValueError, match=r"attention_impl='cpu_fused'; expected 'einsum' or 'xla' with relative"
    ):
        dec.replace(position="relative", attention_impl="cpu_fused")
    with pytest.raises(
        ValueError, match=r"attention_impl='cpu_fused'; expected .* dtype is not float32"
    ):
        dec.replace(dtype="bfloat16", attention_impl="cpu_fused")


def test_a_missing_compiler_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(cpu_attention.CpuAttentionError) as e:
        cpu_attention.library_path()
    assert str(e.value).startswith(
        "model.attention_impl='cpu_fused' needs a C++ compiler: '/nonexistent/c++'"
    )
    assert "\n" not in str(e.value)
    assert list((tmp_path / "repeat_scaling" / "cpu_attention").iterdir()) == []
    monkeypatch.setenv("CXX", "g++ -Dnamespace=")  # a compiler that fails on this source
    with pytest.raises(cpu_attention.CpuAttentionError) as e:
        cpu_attention.library_path()
    message = str(e.value)
    assert message.startswith(
        "model.attention_impl='cpu_fused': compiling cpu_attention.cc failed: "
    )
    assert "error" in message and "\n" not in message
    assert list((tmp_path / "repeat_scaling" / "cpu_attention").iterdir()) == []
