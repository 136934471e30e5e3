"""The train state: an NNX graphdef (static) plus a pytree of arrays, created sharded.

The NNX module is split once into ``graphdef`` (Python structure, static) and its
variables. The train state is a plain dict pytree::

    {"step": int32 scalar (completed updates),
     "params": pure dict of float32 parameter arrays (``nnx.to_pure_dict`` layout),
     "opt_state": the optax state over those params,
     "extra": pure dict of the module's non-parameter variables (usually empty)}

Plain dicts keep the compiled step free of NNX objects and make checkpoints portable.
The step rebuilds the module with ``nnx.merge(graphdef, params, extra)`` inside ``jit``.

Creation never materialises the whole state on one host: :func:`create_train_state`
traces the initialiser with ``jax.eval_shape``, derives each leaf's ``NamedSharding``
from the parameters' logical axis names (``repeat_scaling.sharding``), and runs the
initialiser under ``jax.jit(out_shardings=...)``. Optimizer-state leaves inherit the
sharding of the parameter they mirror (Adafactor's factored row/column statistics keep
the surviving dimensions' sharding); anything else is replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from repeat_scaling import models, sharding
from repeat_scaling.models.config import ModelConfig


@dataclasses.dataclass
class StateInfo:
    """Static facts about a train state: graphdef, abstract state and its shardings."""

    graphdef: Any
    abstract: Any  # pytree of jax.ShapeDtypeStruct (with .sharding set)
    shardings: Any  # pytree of NamedSharding, same structure as the state
    mesh: Mesh


def init_key(seed: int) -> jax.Array:
    """Key used to initialise parameters (dropout uses fold_in(key(seed), 1))."""
    return jax.random.fold_in(jax.random.key(seed), 0)


def dropout_base_key(seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), 1)


def _split(model: nnx.Module):
    graphdef, params, extra = nnx.split(model, nnx.Param, ...)
    return graphdef, params, extra


def _keypath(kp) -> tuple:
    out = []
    for k in kp:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
    return tuple(out)


def opt_state_shardings(
    abstract_opt: Any, abstract_params: Any, param_shardings: Any, mesh: Mesh
) -> Any:
    """Shardings for an optax state: each leaf follows the parameter it mirrors."""
    table: dict[tuple, tuple[tuple, PartitionSpec]] = {}
    for (kp, leaf), s in zip(
        jax.tree_util.tree_flatten_with_path(abstract_params)[0],
        jax.tree.leaves(param_shardings),
        strict=True,
    ):
        table[_keypath(kp)] = (tuple(leaf.shape), s.spec)
    replicated = NamedSharding(mesh, PartitionSpec())

    def named(spec: tuple) -> NamedSharding:
        spec = list(spec)
        while spec and spec[-1] is None:
            spec.pop()
        return NamedSharding(mesh, PartitionSpec(*spec))

    def one(kp, leaf):
        path = _keypath(kp)
        shape = tuple(getattr(leaf, "shape", ()))
        for i in range(len(path)):
            hit = table.get(path[i:])
            if hit is None:
                continue
            pshape, spec = hit
            spec = tuple(spec) + (None,) * (len(pshape) - len(spec))
            if shape == pshape:
                return named(spec)
            if len(pshape) >= 2 and shape == pshape[:-1]:  # adafactor v_row
                return named(spec[:-1])
            if len(pshape) >= 2 and shape == pshape[:-2] + pshape[-1:]:  # adafactor v_col
                return named(spec[:-2] + spec[-1:])
            return replicated
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt)


def create_train_state(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    seed: int,
    rules: Any = sharding.DEFAULT_RULES,
) -> tuple[Any, StateInfo]:
    """Initialise ``(state, info)`` directly sharded on ``mesh``."""
    info = abstract_state(cfg, tx, mesh, rules)

    def create(key):
        model = models.build(cfg, nnx.Rngs(key))
        _, params, extra = _split(model)
        params = nnx.to_pure_dict(params)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "extra": nnx.to_pure_dict(extra),
        }

    with sharding.use_mesh(mesh, rules):
        state = jax.jit(create, out_shardings=info.shardings)(init_key(seed))
    return state, info


def state_from_params(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    info: StateInfo,
    params: Any,
    seed: int,
    rules: Any = sharding.DEFAULT_RULES,
) -> Any:
    """A fresh train state (step 0, ``tx.init``) around given, already placed, ``params``.

    Used for fine-tuning: only the parameters come from elsewhere; the optimizer state
    and non-parameter variables are created as for a new run, directly sharded. (The
    module is rebuilt inside ``jit`` only for its non-parameter variables; XLA drops the
    unused parameter initialisers.)
    """

    def create(key, params):
        model = models.build(cfg, nnx.Rngs(key))
        _, _, extra = _split(model)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "extra": nnx.to_pure_dict(extra),
        }

    with sharding.use_mesh(info.mesh, rules):
        return jax.jit(
            create,
            in_shardings=(None, info.shardings["params"]),
            out_shardings=info.shardings,
            donate_argnums=(1,),
        )(init_key(seed), params)


def abstract_state(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Any = sharding.DEFAULT_RULES,
) -> StateInfo:
    """Shapes, dtypes and shardings of the train state, with nothing allocated."""
    with sharding.use_mesh(mesh, rules):
        abstract_model = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0)))
        graphdef, params_state, extra_state = _split(abstract_model)
        p_shard = nnx.to_pure_dict(sharding.state_shardings(params_state, mesh, rules))
        e_shard = nnx.to_pure_dict(sharding.state_shardings(extra_state, mesh, rules))
        a_params = nnx.to_pure_dict(params_state)
        a_extra = nnx.to_pure_dict(extra_state)
        a_opt = jax.eval_shape(tx.init, a_params)
        o_shard = opt_state_shardings(a_opt, a_params, p_shard, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = {"step": replicated, "params": p_shard, "opt_state": o_shard, "extra": e_shard}
    abstract = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": a_params,
        "opt_state": a_opt,
        "extra": a_extra,
    }
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return StateInfo(graphdef=graphdef, abstract=abstract, shardings=shardings, mesh=mesh)


def abstract_params(
    cfg: ModelConfig, mesh: Mesh, rules: Any = sharding.DEFAULT_RULES
) -> tuple[Any, Any]:
    """``(graphdef, abstract params)`` with shardings on ``mesh`` (for params-only restore)."""
    with sharding.use_mesh(mesh, rules):
        abstract_model = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0)))
        graphdef, params_state, _ = _split(abstract_model)
        p_shard = nnx.to_pure_dict(sharding.state_shardings(params_state, mesh, rules))
        a_params = nnx.to_pure_dict(params_state)
    return graphdef, jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), a_params, p_shard
    )


def merge(graphdef: Any, params: Any, extra: Any | None = None) -> nnx.Module:
    """Rebuild the NNX module from its graphdef and pure-dict variables."""
    if extra:
        return nnx.merge(graphdef, params, extra)
    return nnx.merge(graphdef, params)
