"""Device mesh and logical-axis sharding rules: the ONE place for them.

Every parameter carries logical axis names (``nnx.with_partitioning``, metadata key
``out_sharding``), e.g. ``("embed", "mlp")``; activations are annotated with
:func:`with_logical_constraint`. A rules table maps each logical name to a mesh axis, a
tuple of mesh axes, or ``None`` (replicated). The mesh has four axes, always in this order:

* ``data``   -- pure data parallelism (batch split, parameters replicated);
* ``fsdp``   -- data parallelism with parameters/optimizer state sharded along ``embed``;
* ``tensor`` -- tensor (Megatron) parallelism over heads / mlp / vocab;
* ``expert`` -- expert parallelism for MoE layers (acts as data parallelism elsewhere).

Multi-slice (DCN) meshes are supported through ``make_mesh(ici, dcn)``.

A logical dimension whose size is not divisible by the mesh axes it maps to is replicated
instead of failing (e.g. 6 heads on ``tensor=4``): tiny test models then still run on big
meshes. Mesh axes of size 1 are dropped from the specs.

Typical use (what the trainer does)::

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    with use_mesh(mesh, DEFAULT_RULES):
        abstract = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
        shardings = state_shardings(nnx.state(abstract), mesh)
        state = jax.jit(create_state, out_shardings=shardings)()
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

#: Logical axis name -> mesh axes. Parameters: embed/mlp/heads/kv/vocab/expert/layers/
#: relpos_buckets/norm. Activations: batch/length/act_embed/act_mlp/act_heads/act_kv/
#: act_vocab/act_expert/capacity.
DEFAULT_RULES: dict[str, MeshAxes] = {
    # parameters
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "vocab": "tensor",
    "expert": "expert",
    "layers": None,
    "relpos_buckets": None,
    "norm": None,
    # activations
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "act_embed": None,
    "act_mlp": "tensor",
    "act_heads": "tensor",
    "act_kv": None,
    "act_vocab": "tensor",
    "act_expert": "expert",
    "act_group": ("data", "fsdp"),
    "capacity": None,
}


def check_mesh_axes(sizes: Mapping[str, Any], what: str, fill: bool) -> None:
    """The rules of one mesh-axes mapping (``mesh.ici`` with ``fill=True``, ``mesh.dcn``
    with ``fill=False``): known axes, sizes positive ints, or -1 (fill) once where allowed.
    ValueError (one line naming the entry) otherwise."""
    for axis, size in sizes.items():
        if axis not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {axis!r} in {what}; expected one of {MESH_AXES}")
        ok = (
            isinstance(size, int)
            and not isinstance(size, bool)
            and (size >= 1 or (fill and size == -1))
        )
        if not ok:
            expected = "a positive int or -1 (fill)" if fill else "a positive int (no -1)"
            raise ValueError(f"{what}.{axis}={size!r}; expected {expected}")
    if sum(1 for s in sizes.values() if s == -1) > 1:
        raise ValueError(f"at most one -1 allowed in {what}={dict(sizes)}")


def resolve_mesh(
    ici: Mapping[str, int],
    dcn: Mapping[str, int] | None,
    num_devices: int,
    names: tuple[str, str] = ("ici", "dcn"),
) -> tuple[list[int], list[int]]:
    """``(ici_shape, dcn_shape)`` in ``MESH_AXES`` order for ``num_devices`` devices: the
    one owner of the mesh rules (:func:`check_mesh_axes`; missing axes are 1; one -1 in
    ``ici`` takes the devices left in each slice; ici x dcn must use every device).
    ``names`` are the config keys the one-line ValueErrors name."""
    dcn = dict(dcn or {})
    check_mesh_axes(ici, names[0], fill=True)
    check_mesh_axes(dcn, names[1], fill=False)
    dcn_shape = [int(dcn.get(a, 1)) for a in MESH_AXES]
    num_slices = math.prod(dcn_shape)
    if num_devices % num_slices:
        raise ValueError(
            f"{names[1]}={dcn} needs a multiple of {num_slices} devices, found {num_devices}"
        )
    per_slice = num_devices // num_slices
    shape = [int(ici.get(a, 1)) for a in MESH_AXES]
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if per_slice % known:
            raise ValueError(
                f"cannot fill -1 in {names[0]}={dict(ici)}: {per_slice} devices per slice "
                f"are not divisible by {known}"
            )
        shape[shape.index(-1)] = per_slice // known
    used = math.prod(shape) * num_slices
    if used != num_devices:
        where = f"{names[0]}={dict(ici)}" + (f" x {names[1]}={dcn}" if num_slices > 1 else "")
        raise ValueError(
            f"{where} uses {used} devices, but {num_devices} exist; expected {num_devices} "
            "in all (one ici axis may be -1 to fill)"
        )
    return shape, dcn_shape


def make_mesh(
    ici: Mapping[str, int],
    dcn: Mapping[str, int] | None = None,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """Build a mesh with axes ``MESH_AXES``.

    Args:
      ici: axis -> size within a slice (missing axes are 1; one -1 fills the rest).
      dcn: axis -> number of slices along that axis (multi-slice); ``None`` = one slice.
      devices: devices to use (default ``jax.devices()``).
    """
    devices = list(jax.devices() if devices is None else devices)
    ici_shape, dcn_shape = resolve_mesh(ici, dcn, len(devices))
    if math.prod(dcn_shape) > 1:
        arr = _hybrid_device_array(ici_shape, dcn_shape, devices)
    else:
        try:
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_device_mesh(ici_shape, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(devices, dtype=object).reshape(ici_shape)
    return Mesh(arr, MESH_AXES)


def _hybrid_device_array(ici_shape: list[int], dcn_shape: list[int], devices: list) -> np.ndarray:
    """Devices for a multi-slice mesh: slices (TPU ``slice_index``, else processes, else
    contiguous device blocks, e.g. virtual CPU devices) tiled along the DCN axes."""
    from jax.experimental import mesh_utils

    if hasattr(devices[0], "slice_index"):
        return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices=devices)
    if len({d.process_index for d in devices}) == math.prod(dcn_shape):
        return mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices=devices, process_is_granule=True
        )
    # One device block per slice: [dcn..., ici...] -> interleave -> [dcn_i * ici_i ...].
    n = len(ici_shape)
    arr = np.asarray(devices, dtype=object).reshape(list(dcn_shape) + list(ici_shape))
    order = [a for i in range(n) for a in (i, n + i)]
    return arr.transpose(order).reshape([d * i for d, i in zip(dcn_shape, ici_shape, strict=True)])


def _as_tuple(m: MeshAxes) -> tuple[str, ...]:
    if m is None:
        return ()
    if isinstance(m, str):
        return (m,)
    return tuple(m)


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None] | None,
    rules: Rules = DEFAULT_RULES,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec.

    Unknown logical names raise ValueError. With ``mesh``, axes of size 1 are dropped and
    a mesh axis is used at most once per spec (first dimension wins). With ``shape`` too,
    mesh axes that do not divide the dimension are dropped (replicated).
    """
    if logical_axes is None:
        return PartitionSpec()
    used: set[str] = set()
    out: list[Any] = []
    for i, name in enumerate(logical_axes):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(
                f"logical axis {name!r} has no sharding rule; expected one of {sorted(rules)}"
            )
        axes = []
        prod = 1
        for a in _as_tuple(rules[name]):
            if a in used:
                continue
            size = mesh.shape[a] if mesh is not None else 1
            if mesh is not None and size == 1:
                continue
            if shape is not None and shape[i] % (prod * size):
                continue
            axes.append(a)
            prod *= size
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for every variable of an ``nnx.State`` (concrete or abstract).

    Returns a pytree of the same structure whose variable values are NamedShardings
    (usable as ``jax.jit(..., out_shardings=...)`` for a function returning the state).
    Variables without ``out_sharding`` metadata are replicated.
    """

    def one(v):
        if not _is_var(v):
            return NamedSharding(mesh, PartitionSpec())
        names = v.get_metadata().get("out_sharding")
        spec = (
            logical_to_mesh_spec(names, rules, mesh, tuple(v.shape)) if names else PartitionSpec()
        )
        return v.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=_is_var)


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an input batch array [batch, length] (also fine for [batch])."""
    return NamedSharding(mesh, logical_to_mesh_spec(("batch",), rules, mesh))


@dataclasses.dataclass
class _Ctx(threading.local):
    mesh: Mesh | None = None
    rules: Rules | None = None


_ctx = _Ctx()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[Mesh]:
    """Make (mesh, rules) active for :func:`with_logical_constraint` (at trace time)."""
    old = (_ctx.mesh, _ctx.rules)
    _ctx.mesh, _ctx.rules = mesh, dict(rules)
    try:
        yield mesh
    finally:
        _ctx.mesh, _ctx.rules = old


def current_mesh() -> tuple[Mesh | None, Rules | None]:
    """The (mesh, rules) made active by :func:`use_mesh`, or (None, None)."""
    return _ctx.mesh, _ctx.rules


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation; a no-op outside :func:`use_mesh`."""
    mesh, rules = _ctx.mesh, _ctx.rules
    if mesh is None or rules is None or mesh.size == 1:
        return x
    spec = logical_to_mesh_spec(logical_axes, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
