"""``attention_impl="cpu_fused"``: masked softmax attention as one XLA:CPU custom call.

The einsum path's attention core (scores, mask, softmax, context; scale 1, no bias, no
dropout) and its VJP, computed per (batch, head) pair by ``cpu_attention.cc`` with the
pair's rows in cache and the keys past each row's last unmasked key skipped. XLA:CPU runs
the einsum path as ~20 separate passes over [B, H, L, L] tensors and batched dots with a
head-dim contraction; for the CPU campaigns' models (head_dim 8-32, length 128) that is
about half of a training step (docs/benchmarks.md).

The values are those of the einsum path up to float32 rounding (another summation order
and exp polynomial). The rotary embedding of q and k happens in the kernel, from the
tables of :func:`repeat_scaling.models.layers.rope_tables`, in the float operations of
:func:`~repeat_scaling.models.layers.rotate`: XLA:CPU would recompute the tables' sines
and cosines in each of its passes over q, k and their gradients. The parameters do not
depend on the choice: a checkpoint trained with one implementation evaluates with another.

The kernel is compiled on first use with the host's C++ compiler (``$CXX``, default
``g++``) against the installed jaxlib's FFI headers, for this CPU (``-march=native``), into
``$XDG_CACHE_HOME/repeat_scaling/cpu_attention/``, keyed by the source, the compiler
command and the CPU's flags. On other backends, or without a compiler, the model raises a
one-line error naming the setting.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shlex
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from repeat_scaling import workdir_io

Array = jax.Array

SOURCE = pathlib.Path(__file__).with_suffix(".cc")
#: The head sizes the kernel is compiled for (``with_head_dim`` in cpu_attention.cc).
HEAD_DIMS = (8, 16, 32, 64, 128)
_TARGETS = {"forward": "RsAttentionForward", "backward": "RsAttentionBackward"}
_FLAGS = "-O3 -march=native -std=c++17 -shared -fPIC -pthread -fno-math-errno -fno-trapping-math"


class CpuAttentionError(RuntimeError):
    """The fused CPU attention cannot be built or used here."""


def _cpu_flags() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compile_command(out: pathlib.Path) -> list[str]:
    include = jax.ffi.include_dir()
    cxx = shlex.split(os.environ.get("CXX", "g++"))
    return [*cxx, *_FLAGS.split(), f"-I{include}", str(SOURCE), "-o", str(out)]


def library_path() -> pathlib.Path:
    """The compiled kernel for this source, compiler and CPU (built if missing)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(_compile_command(pathlib.Path("x"))).encode())
    key.update(_cpu_flags().encode())
    out_dir = workdir_io.user_cache_dir() / "cpu_attention"
    path = out_dir / f"cpu_attention-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = _compile_command(pathlib.Path(tmp))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise CpuAttentionError(
            f"model.attention_impl='cpu_fused' needs a C++ compiler: {cmd[0]!r} ({e.strerror});"
            " set $CXX or use attention_impl='einsum'"
        ) from None
    if done.returncode:
        os.unlink(tmp)
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        first = next((x for x in lines if "error" in x), lines[0])
        raise CpuAttentionError(
            f"model.attention_impl='cpu_fused': compiling {SOURCE.name} failed: {first}"
        )
    os.replace(tmp, path)  # atomic: concurrent builders leave one complete library
    return path


@functools.cache
def _register() -> None:
    lib = ctypes.cdll.LoadLibrary(str(library_path()))
    for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(
            f"repeat_scaling_attention_{name}",
            jax.ffi.pycapsule(getattr(lib, symbol)),
            platform="cpu",
        )


def _call(name: str, results, *args):
    if jax.default_backend() != "cpu":
        raise CpuAttentionError(
            f"model.attention_impl='cpu_fused' runs on CPU only (backend "
            f"{jax.default_backend()!r}); use 'einsum', 'xla' or 'cudnn'"
        )
    _register()
    call = jax.ffi.ffi_call(f"repeat_scaling_attention_{name}", results, vmap_method="sequential")
    return call(*args)


def _forward(q, k, v, mask, rope):
    B, Lq, H, _ = q.shape
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    weights = jax.ShapeDtypeStruct((B, H, Lq, k.shape[1]), jnp.float32)
    return _call("forward", (out, weights), q, k, v, mask, *rope)


@jax.custom_vjp
def attention(q: Array, k: Array, v: Array, mask: Array, rope: tuple[Array, ...]) -> Array:
    """``softmax(where(mask, einsum("bqhd,bkhd->bhqk", rq, rk), -1e10)) @ v`` as [B, Lq, H, D]
    with ``rq = rotate(q, sin_q, cos_q)``, ``rk = rotate(k, sin_k, cos_k)``.

    q [B, Lq, H, D], k and v [B, Lk, H, D] float32; mask bool [1|B, 1|H, Lq, Lk];
    rope = (sin_q, cos_q, sin_k, cos_k): [1|B, Lq, D/2] and [1|B, Lk, D/2] float32.
    """
    return _forward(q, k, v, mask, rope)[0]


def _attention_fwd(q, k, v, mask, rope):
    out, weights = _forward(q, k, v, mask, rope)
    return out, (q, k, v, mask, rope, weights)


def _attention_bwd(residuals, g):
    q, k, v, mask, rope, weights = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = _call("backward", shapes, q, k, v, mask, *rope, weights, g.astype(jnp.float32))
    return dq, dk, dv, None, tuple(jnp.zeros_like(t) for t in rope)


attention.defvjp(_attention_fwd, _attention_bwd)


def _no_rotation(length: int, head_dim: int) -> tuple[Array, Array]:
    return jnp.zeros((1, length, head_dim // 2)), jnp.ones((1, length, head_dim // 2))


def fused_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None,
    rope: tuple[tuple[Array, Array], tuple[Array, Array]] | None = None,
) -> Array:
    """:func:`attention` for the model's shapes: a missing mask attends everywhere;
    ``rope`` = ((sin_q, cos_q), (sin_k, cos_k)) rotates q and k first (None: no rotation,
    as sin 0 and cos 1 leave every value as it is)."""
    if q.dtype != jnp.float32 or k.dtype != jnp.float32 or v.dtype != jnp.float32:
        raise CpuAttentionError(
            f"model.attention_impl='cpu_fused' computes in float32 (got {q.dtype}); use "
            "dtype='float32' or attention_impl='einsum'"
        )
    if mask is None:
        mask = jnp.ones((1, 1, q.shape[1], k.shape[1]), bool)
    if rope is None:
        rope = (_no_rotation(q.shape[1], q.shape[3]), _no_rotation(k.shape[1], k.shape[3]))
    (sin_q, cos_q), (sin_k, cos_k) = rope
    tables = tuple(t.astype(jnp.float32) for t in (sin_q, cos_q, sin_k, cos_k))
    return attention(q, k, v, jnp.asarray(mask, bool), tables)
