"""Mesh construction, logical rules, and sharded models on 8 CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from repeat_scaling import sharding
from repeat_scaling.models import build, forward, sizes

ENC_DEC = sizes.get("t5_tiny").replace(d_model=32, d_ff=64, head_dim=8)
DEC_MOE = sizes.get("dec_tiny_moe").replace(d_model=32, d_ff=64, head_dim=8)


def test_make_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"data": -1, "tensor": 2})
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1}
    with pytest.raises(ValueError, match="expected 8"):
        sharding.make_mesh({"data": 3})
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        sharding.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1})
    multi = sharding.make_mesh({"fsdp": 2, "tensor": 2}, dcn={"data": 2})
    assert dict(multi.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    # Each DCN slice is one contiguous block of devices.
    assert {d.id for d in multi.devices[0].flat} == set(range(4))


def test_logical_rules():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = sharding.logical_to_mesh_spec
    assert spec(("embed", "mlp"), mesh=mesh) == P("fsdp", "tensor")
    assert spec(("batch", "length"), mesh=mesh) == P(("data", "fsdp"))  # expert=1 dropped
    assert spec(("batch", "length")) == P(("data", "fsdp", "expert"))
    assert spec(("heads", "kv"), mesh=mesh, shape=(3, 8)) == P()  # 3 heads: replicated
    assert spec(("embed", "embed"), mesh=mesh) == P("fsdp")  # a mesh axis is used once
    with pytest.raises(ValueError, match="logical axis 'bogus'"):
        spec(("bogus",))
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    x = jnp.ones((4, 4))
    assert sharding.with_logical_constraint(x, ("batch", "embed")) is x  # no active mesh


def _sharded(cfg, mesh, feats):
    """What the trainer does: abstract state -> shardings -> jit(create, out_shardings)."""
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        abstract = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
        graphdef, abs_state = nnx.split(abstract)
        shardings = sharding.state_shardings(abs_state, mesh)
        state = jax.jit(lambda: nnx.split(build(cfg, nnx.Rngs(0)))[1], out_shardings=shardings)()
        feats = jax.device_put(feats, sharding.batch_sharding(mesh))
        out, aux = jax.jit(lambda s, f: forward(nnx.merge(graphdef, s), f))(state, feats)
    return state, out, aux


@functools.cache
def _reference(cfg):
    """Single-device (unsharded, eager-initialised) parameters and outputs."""
    tok = jnp.asarray(np.random.RandomState(0).randint(2, 300, (8, 12)), jnp.int32)
    feats = {"decoder_input_tokens": tok, "decoder_target_tokens": tok}
    if cfg.arch == "encoder_decoder":
        feats["encoder_input_tokens"] = tok
    model = build(cfg, nnx.Rngs(0))
    out, aux = nnx.jit(lambda m, f: forward(m, f))(model, feats)
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    return feats, flat, out, aux


@pytest.mark.parametrize(
    "cfg,ici",
    [
        (ENC_DEC, {"data": 8}),
        (ENC_DEC, {"data": 4, "fsdp": 2}),
        (ENC_DEC, {"data": 2, "fsdp": 2, "tensor": 2}),
        (DEC_MOE, {"data": 2, "tensor": 2, "expert": 2}),
    ],
    ids=["enc_dec-8x1", "enc_dec-4x2", "enc_dec-2x2x2", "moe-2x1x2x2"],
)
def test_sharded_init_and_forward_match_single_device(cfg, ici):
    feats, ref_flat, ref_out, ref_aux = _reference(cfg)
    mesh = sharding.make_mesh(ici)
    state, out, aux = _sharded(cfg, mesh, feats)
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        names = var.get_metadata()["out_sharding"]
        want = sharding.logical_to_mesh_spec(names, sharding.DEFAULT_RULES, mesh, value.shape)
        assert value.sharding.spec == want, path
        # Same values (compiled vs eager initialisers may differ in the last ulp).
        np.testing.assert_allclose(np.asarray(value), ref_flat[path], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5)
    for k in ref_aux:
        np.testing.assert_allclose(float(aux[k]), float(ref_aux[k]), rtol=1e-5)
    if cfg.is_moe:
        wi = state["decoder"]["layers"]["layers"]["layers"][1]["mlp"]["wi_0"].get_value()
        assert wi.sharding.spec == P(None, "expert", None, "tensor")
