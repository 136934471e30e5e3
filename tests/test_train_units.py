"""Unit tests of the trainer's parts that need no model: schedules, optimizer-state
sharding, checkpoint manager, metrics files, mesh arithmetic, distributed flags."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from repeat_scaling import sharding
from repeat_scaling.train import checkpointing, distributed, metrics, optimizers
from repeat_scaling.train import config as config_lib
from repeat_scaling.train import state as state_lib


def _opt(**kw):
    o = config_lib.default_config().train.optimizer
    o.update(kw)
    return o


def test_rsqrt_schedule_is_t5():
    sched = optimizers.make_schedule(
        _opt(schedule="rsqrt", learning_rate=1.0, warmup_steps=10_000), 100
    )
    assert float(sched(0)) == pytest.approx(0.01)
    assert float(sched(9_999)) == pytest.approx(0.01)
    assert float(sched(40_000)) == pytest.approx(0.005)


def test_cosine_and_linear_schedules():
    o = _opt(schedule="cosine", learning_rate=1e-3, warmup_steps=10, end_learning_rate_fraction=0.1)
    s = optimizers.make_schedule(o, 110)
    assert float(s(0)) == 0.0
    assert float(s(10)) == pytest.approx(1e-3)
    assert float(s(110)) == pytest.approx(1e-4, rel=1e-4)
    assert float(s(60)) == pytest.approx(0.55e-3, rel=1e-3)  # cosine midpoint
    o.schedule = "linear"
    s = optimizers.make_schedule(o, 110)
    assert float(s(5)) == pytest.approx(0.5e-3)
    assert float(s(60)) == pytest.approx(0.55e-3, rel=1e-4)
    o.schedule = "constant"
    assert float(optimizers.make_schedule(o, 110)(100)) == pytest.approx(1e-3)


def test_adamw_weight_decay_skips_vectors_and_clipping_bounds_update():
    params = {"w": jnp.ones((4, 4)), "scale": jnp.ones((4,))}
    grads = jax.tree.map(jnp.zeros_like, params)
    tx, _ = optimizers.make_optimizer(
        _opt(
            name="adamw", schedule="constant", learning_rate=0.1, warmup_steps=0, weight_decay=0.5
        ),
        10,
    )
    upd, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(upd["scale"]).max()) == 0.0
    assert float(upd["w"][0, 0]) == pytest.approx(-0.1 * 0.5)
    tx, _ = optimizers.make_optimizer(
        _opt(name="adamw", schedule="constant", learning_rate=1.0, warmup_steps=0, clip_norm=1e-3),
        10,
    )
    big = {"w": jnp.full((4, 4), 1e6), "scale": jnp.full((4,), -1e6)}
    upd, _ = tx.update(big, tx.init(params), params)  # adam normalises: |update| ~ lr
    assert np.all(np.isfinite(np.asarray(upd["w"])))


def test_adafactor_state_follows_param_sharding():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = {
        "dense": {"kernel": jax.ShapeDtypeStruct((256, 512), jnp.float32)},
        "norm": jax.ShapeDtypeStruct((256,), jnp.float32),
    }
    p_shard = {
        "dense": {"kernel": NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))},
        "norm": NamedSharding(mesh, PartitionSpec()),
    }
    tx, _ = optimizers.make_optimizer(_opt(name="adafactor"), 10)
    a_opt = jax.eval_shape(tx.init, params)
    sh = state_lib.opt_state_shardings(a_opt, params, p_shard, mesh)
    specs = {
        (jax.tree_util.keystr(kp), tuple(leaf.shape)): s.spec
        for (kp, leaf), s in zip(
            jax.tree_util.tree_flatten_with_path(a_opt)[0], jax.tree.leaves(sh)
        )
    }
    kernel = {shape: spec for (path, shape), spec in specs.items() if "kernel" in path}
    assert kernel[(256,)] == PartitionSpec("fsdp")  # factored row statistics
    assert kernel[(512,)] == PartitionSpec("tensor")  # factored column statistics
    assert all(spec == PartitionSpec() for (path, _), spec in specs.items() if "norm" in path)


def _toy_state(mesh, step, scale=1.0):
    rep = NamedSharding(mesh, PartitionSpec())
    row = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    w = jax.device_put(jnp.arange(16.0).reshape(8, 2) * scale, row)
    return {
        "step": jax.device_put(jnp.asarray(step, jnp.int32), rep),
        "params": {"w": w},
        "opt_state": {"m": jax.device_put(jnp.ones((8, 2)) * step, row)},
        "extra": {},
    }


def test_checkpointer_retention_restore_and_params_only(tmp_path):
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    ck = checkpointing.Checkpointer(tmp_path, save_every=2, keep=2, keep_period=4)
    for step in range(1, 11):
        ck.save(_toy_state(mesh, step, scale=step))
    ck.wait()
    assert ck.all_steps() == [4, 8, 10]  # last two + every 4th
    mesh1 = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(mesh1, PartitionSpec())
        ),
        _toy_state(mesh, 0),
    )
    restored = ck.restore(8, abstract)
    ck.close()
    assert int(restored["step"]) == 8
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(16.0).reshape(8, 2) * 8)
    assert restored["params"]["w"].sharding.mesh.size == 1
    # A half-written checkpoint (orbax temp dir) is invisible and cleaned up.
    tmp = checkpointing.checkpoint_dir(tmp_path) / "12.orbax-checkpoint-tmp-123"
    tmp.mkdir()
    ck2 = checkpointing.Checkpointer(tmp_path, save_every=2, keep=2, keep_period=4)
    assert ck2.latest_step() == 10
    ck2.close()


def test_restore_params_errors(tmp_path):
    with pytest.raises(checkpointing.CheckpointError, match="config.json"):
        checkpointing.restore_params(tmp_path)


def test_truncate_jsonl_and_throughput(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + "{bad\n")
    metrics.truncate_jsonl(p, 3)
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [1, 2, 3]
    t = metrics.throughput(0.5, 1000, 6e6, 100.0)
    assert t["tokens_per_s"] == 2000 and t["model_tflops_per_s"] == pytest.approx(0.012)
    assert t["mfu"] == pytest.approx(0.012 / 100)
    assert metrics.throughput(1.0, 1, 1.0, None)["mfu"] is None
    assert metrics.lookup_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0


def test_mesh_shape_and_distributed_flags():
    assert config_lib.mesh_shape({"data": -1, "tensor": 2}, {}, 8)["data"] == 4
    with pytest.raises(config_lib.ConfigError, match="uses 4 devices, but 8 exist"):
        config_lib.mesh_shape({"data": 4}, {}, 8)
    with pytest.raises(ValueError, match="needs num_processes"):
        distributed.initialize("localhost:1234", None, None)
    with pytest.raises(ValueError, match="process_id=3"):
        distributed.initialize("localhost:1234", 2, 3)
    assert distributed.initialize() is False


def test_optax_chain_has_clipping():
    tx, _ = optimizers.make_optimizer(_opt(name="adafactor", clip_norm=1.0), 10)
    assert isinstance(tx, optax.GradientTransformation)
